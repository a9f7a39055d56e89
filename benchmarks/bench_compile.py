"""Does ``torch.compile`` pay on scoring's hot path? (issue 12, item 4: measured, not assumed)

Eager against ``torch.compile`` (inductor, the default mode) for the two model stages of scoring, side by
side in one process, one torch thread, CPU time (the process's own, which a shared machine inflates least):

* the SAM over a 1536 x 2048 thumbnail (a 3.2-GP slide at 1/32) in scoring's 128-px halo tiles;
* the agent over 5 tiles (``--preset``; paper-her2: 2048² tiles, 6 glimpses).

For each: the first compiled call (compilation included), then the median of ``--repeats`` steady calls of
each, and the largest difference between the compiled and eager outputs. Writes
``benchmarks/results/compile.json``.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_compile.py [--preset paper-her2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "compile.json"


def cpu_seconds(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.process_time()
    out = fn()
    return time.process_time() - started, out


def measure(name: str, eager: Callable[[], Any], compiled: Callable[[], Any], repeats: int) -> dict[str, Any]:
    import torch

    eager()  # eager warm-up (first-call allocations)
    first_started = time.perf_counter()
    first_s, compiled_out = cpu_seconds(compiled)  # inductor compiles partly in worker processes: wall too
    first_wall_s = time.perf_counter() - first_started
    eager_s = [cpu_seconds(eager)[0] for _ in range(repeats)]
    compiled_s = [cpu_seconds(compiled)[0] for _ in range(repeats)]
    eager_out = eager()
    pairs = zip(eager_out if isinstance(eager_out, tuple) else (eager_out,),
                compiled_out if isinstance(compiled_out, tuple) else (compiled_out,), strict=True)
    max_diff = max(float((a - b).abs().max()) for a, b in pairs if isinstance(a, torch.Tensor))
    row = {"stage": name, "first_compiled_call_cpu_s": round(first_s, 2),
           "first_compiled_call_wall_s": round(first_wall_s, 2),
           "eager_cpu_s": round(statistics.median(eager_s), 3),
           "compiled_cpu_s": round(statistics.median(compiled_s), 3),
           "speedup": round(statistics.median(eager_s) / statistics.median(compiled_s), 2),
           "max_abs_difference": max_diff}
    row["slides_to_repay_compilation"] = (
        round(max(first_s, first_wall_s) / (row["eager_cpu_s"] - row["compiled_cpu_s"]), 1)
        if row["eager_cpu_s"] > row["compiled_cpu_s"] else None)
    print(f"| {name} | {row['eager_cpu_s']} | {row['compiled_cpu_s']} | {row['speedup']}x | {first_s:.1f} / "
          f"{first_wall_s:.1f} | "
          f"{row['slides_to_repay_compilation']} | {max_diff:.1e} |", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="paper-her2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warm-cache", action="store_true",
                        help="reuse inductor's on-disk cache (default: a fresh one, as a new replica or job has)")
    args = parser.parse_args()
    if not args.warm_cache:
        import tempfile

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-compile-inductor-")

    import torch

    from dual_attention.config import preset
    from dual_attention.models import DualAttentionModel
    from dual_attention.pipeline import SAM_TILE_PX

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = preset(args.preset)
    model = DualAttentionModel(config).eval()
    thumbnail = torch.rand(1, 3, 1536, 2048)
    tile_px = config.tile.tile_level0_px
    tiles = torch.rand(5, 3, tile_px, tile_px)
    first = torch.zeros(5, 2)
    sam, agent = model.soft_attention, model.agent
    compiled_sam = torch.compile(sam._inference_logits)
    compiled_agent = torch.compile(agent)

    def tiled(logits_fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            original = sam._inference_logits
            sam._inference_logits = logits_fn  # tiled_logits calls it once per tile
            try:
                with torch.inference_mode():
                    return sam.tiled_logits(thumbnail, SAM_TILE_PX).clone()
            finally:
                sam._inference_logits = original
        return run

    def agent_run(module: Any) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        def run() -> tuple[torch.Tensor, torch.Tensor]:
            with torch.inference_mode():
                out = module(tiles, deterministic=True, first_locations=first)
            return out.class_log_probs.clone(), out.locations.clone()
        return run

    print("| stage | eager CPU s | compiled CPU s | speed-up | first compiled call CPU / wall s | slides to repay | "
          "max abs difference |")
    rows = [measure(f"SAM, 1536x2048 thumbnail in {SAM_TILE_PX}-px tiles ({args.preset})",
                    tiled(sam._inference_logits), tiled(compiled_sam), args.repeats),
            measure(f"agent, 5 tiles of {tile_px}² ({args.preset})", agent_run(agent), agent_run(compiled_agent),
                    args.repeats)]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"preset": args.preset, "torch": torch.__version__, "threads": 1,
                                   "inductor_cache": "warm" if args.warm_cache else "fresh",
                                   "repeats": args.repeats, "load_average": os.getloadavg(),
                                   "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "rows": rows},
                                  indent=2) + "\n")


if __name__ == "__main__":
    main()
