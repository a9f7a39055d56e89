"""``python -m serve``: the same as ``dual-attention serve``."""

import sys

from serve.cli import main

sys.exit(main(prog="python -m serve"))
