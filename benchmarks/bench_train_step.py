"""Training step time per worker, split into the time blocked on tile reads and the rest (SAM, sampler,
agent, backward, DDP all-reduce), with 1 and 2 Ray Train workers, reading tiles through the Ray tile plane
(``pool``) or in the worker process (``local``).

Runs the real training loop (``jobs.train.fit_fold``: TorchTrainer, DDP, TilePool per worker) on a
synthetic cohort, without MLflow. A step reads its slides' tiles in background threads while it computes
(``training.training_step``); "tile wait" is the time the step blocked on them. Writes
``benchmarks/results/train_step.json``. The first epoch is a warm-up (process start, first slide opens) and is
left out. Target: tile wait <= 10% of step time.

    .venv/bin/python benchmarks/bench_train_step.py [--slides 16] [--slide-px 4096] [--epochs 3]
        [--steps 4] [--preset cpu-small] [--workers 1 2] [--readers pool local]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slides", type=int, default=16)
    parser.add_argument("--slide-px", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per setting; the first is warm-up")
    parser.add_argument("--steps", type=int, default=4, help="training steps per worker per epoch")
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tile-actors-per-worker", type=int, default=1)
    parser.add_argument("--readers", nargs="+", default=["pool", "local"], choices=["pool", "local"],
                        help="pool: Ray tile-reader actors; local: OpenSlide in the training worker")
    parser.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the local Ray instance")
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray

    from dual_attention.config import preset
    from dual_attention.synthetic import write_cohort
    from jobs.train import TrainRun, fit_fold, prepare_cohort

    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    manifest = write_cohort(root / "cohort", "her2", args.slides, seed=11, slide_level0_px=args.slide_px, n_folds=4,
                            progress=False)
    project_root = str(Path(__file__).resolve().parents[1])
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": project_root}})
    rows = []
    try:
        cohort = None
        for reader, workers in [(r, w) for r in args.readers for w in args.workers]:
            config = preset(args.preset).with_overrides({
                "train.epochs": args.epochs, "train.num_workers": workers, "train.steps_per_epoch": args.steps,
                "train.val_fold": 0,
            })
            cohort = cohort or prepare_cohort(manifest, config, root / "cache")
            started = time.perf_counter()
            run = TrainRun(root / f"run-{reader}-{workers}w", device="cpu", max_failures=0, overlays_per_epoch=0,
                           tile_actors_per_worker=args.tile_actors_per_worker, tile_reader=reader)
            result = fit_fold(config, cohort, run, val_fold=0)
            wall = time.perf_counter() - started
            if result.error is not None:
                raise RuntimeError(f"benchmark fit with {workers} workers failed: {result.error}")
            frame = result.metrics_dataframe.sort_values("epoch")
            measured = frame[frame["epoch"] >= 1]
            steps = measured["train_steps_per_worker"].to_numpy()
            wait = measured["train_tile_wait_seconds"].to_numpy() / steps
            compute = measured["train_compute_seconds"].to_numpy() / steps
            rows.append({
                "reader": reader,
                "default": reader == ("local" if TrainRun(root).reads_tiles_in_worker(use_gpu=False) else "pool"),
                "workers": workers,
                "step_s": float(np.mean(wait + compute)),
                "tile_wait_s": float(np.mean(wait)),
                "compute_s": float(np.mean(compute)),
                "wait_fraction": float(np.sum(wait) / np.sum(wait + compute)),
                "slides_per_s": float(workers * config.train.slides_per_batch / np.mean(wait + compute)),
                "mpix_per_epoch": float(measured["level0_pixels_read"].mean() / 1e6),
                "fit_wall_s": wall,
            })
    finally:
        ray.shutdown()

    results = Path(__file__).resolve().parent / "results" / "train_step.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"args": vars(args), "cores": os.cpu_count(), "load_average": os.getloadavg(),
                                   "rows": rows}, indent=1))
    print(f"\ncohort: {args.slides} synthetic HER2 slides of {args.slide_px}² px; preset {args.preset}; "
          f"{args.steps} steps/worker/epoch, {args.epochs - 1} measured epochs (first is warm-up); "
          f"{args.tile_actors_per_worker} tile actor(s) per worker; {os.cpu_count()} cores")
    print("| tile reads | workers | step (s) | tile wait (s) | compute (s) | tile wait / step | slides/s (all workers) | "
          "level-0 Mpx read per epoch (train + val) | fit wall (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        reader = f"{r['reader']} (default)" if r["default"] else r["reader"]
        print(f"| {reader} | {r['workers']} | {r['step_s']:.3f} | {r['tile_wait_s']:.3f} | {r['compute_s']:.3f} | "
              f"{100 * r['wait_fraction']:.1f}% | {r['slides_per_s']:.2f} | {r['mpix_per_epoch']:.1f} | "
              f"{r['fit_wall_s']:.0f} |")
    for reader in args.readers:
        same = [r for r in rows if r["reader"] == reader]
        if len(same) >= 2:
            print(f"{reader}: step time {same[1]['workers']} vs {same[0]['workers']} workers "
                  f"{same[1]['step_s'] / same[0]['step_s']:.2f}x; throughput "
                  f"{same[1]['slides_per_s'] / same[0]['slides_per_s']:.2f}x")
    for r in rows:
        verdict = "met" if r["wait_fraction"] <= 0.10 else "NOT met"
        default = " (the default on CPU workers)" if r["default"] else ""
        print(f"target tile wait <= 10% of step time, {r['reader']} reads{default}, {r['workers']} worker(s): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
