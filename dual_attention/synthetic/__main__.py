"""``python -m dual_attention.synthetic``: write a synthetic cohort."""

import sys

from dual_attention.synthetic.cohort import main

sys.exit(main())
