"""The `dual-attention` command: one subcommand per job, each delegating to its module's ``main(argv)``.

Subcommand modules are imported only when called, so ``dual-attention synth`` never starts Ray and
``--help`` is fast. Every module listed here also runs as ``python -m MODULE`` with the same arguments,
which is how the jobs are submitted to a cluster (``ray job submit --working-dir . -- python -m jobs.train``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module with a ``main(argv) -> int``, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("dual_attention.synthetic", "generate a synthetic IHC cohort (pyramidal TIFFs + Parquet manifest)"),
    "preprocess": ("jobs.preprocess", "thumbnails + tissue masks for a manifest, in parallel, cached"),
    "train": ("jobs.train", "train the dual attention model with Ray Train, tracked in MLflow"),
    "evaluate": ("jobs.evaluate", "slide-level evaluation of a registered model or checkpoint"),
    "baselines": ("jobs.baselines", "random-sampling and sliding-window baselines"),
    "tune": ("tune.search", "Ray Tune search over alpha, delta, the noise range and learning rates"),
    "serve": ("serve.cli", "start the HTTP scoring service (Ray Serve) on 127.0.0.1"),
    "score": ("jobs.score", "score one slide locally: JSON + overlay PNG"),
    "score-cohort": ("jobs.score_cohort", "score a cohort as a Ray Data job: Parquet slide and tile scores, resumable"),
    "bench": ("dual_attention_cli.bench", "list or run the benchmarks"),
    "quickstart": ("dual_attention_cli.quickstart", "the whole product end to end on a small synthetic cohort"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="dual-attention",
        description="Train, tune and serve the dual attention model for IHC whole-slide scoring.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv or ["--help"])
        return 2
    module_name, _ = SUBCOMMANDS[argv[0]]
    module = importlib.import_module(module_name)
    return int(module.main(argv[1:], prog=f"dual-attention {argv[0]}") or 0)


if __name__ == "__main__":
    sys.exit(main())
