"""``dual-attention bench``: list or run the benchmarks in ``benchmarks/`` (results go to benchmarks/RESULTS.md).

    dual-attention bench --list
    dual-attention bench tile_plane -- --slide-px 32768     # arguments after -- go to the benchmark
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

BENCHMARKS_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def available() -> dict[str, Path]:
    return {path.stem.removeprefix("bench_"): path for path in sorted(BENCHMARKS_DIR.glob("bench_*.py"))}


def _first_doc_line(path: Path) -> str:
    for line in path.read_text().splitlines():
        text = line.strip().strip('"').strip()
        if text and not text.startswith(("#", "from", "import")):
            return text
    return ""


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1 :]
    benchmarks = available()
    parser = argparse.ArgumentParser(prog=prog or "dual-attention bench", description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", choices=sorted(benchmarks), help="benchmark to run")
    parser.add_argument("--list", action="store_true", help="list the benchmarks")
    args = parser.parse_args(argv)
    if args.list or not args.name:
        if not benchmarks:
            print(f"no benchmarks found in {BENCHMARKS_DIR}", file=sys.stderr)
            return 1
        for name, path in benchmarks.items():
            print(f"{name:24s} {_first_doc_line(path)}")
        return 0
    return subprocess.call([sys.executable, str(benchmarks[args.name]), *extra], cwd=BENCHMARKS_DIR.parent)


if __name__ == "__main__":
    sys.exit(main())
