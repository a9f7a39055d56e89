"""The model's two stages on a GPU at the paper's sizes, against the CPU in the same run: the soft
attention over a thumbnail and the agent over a slide's tiles (no slide reads: random pixels of the
right shapes), plus one paper-size joint training step on the GPU.

    python benchmarks/bench_gpu.py [--out benchmarks/results/gpu.json]

Needs a CUDA device; writes the JSON and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dual_attention.config import preset
from dual_attention.models import DualAttentionModel, images_to_tensor
from dual_attention.pipeline import SAM_TILE_PX, attention_map_of
from dual_attention.training import SlideBatch, TrainingStep, build_optimizer, optimise


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up call, synchronising the GPU."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu.json"))
    parser.add_argument("--cpu-threads", type=int, default=8)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    torch.set_num_threads(args.cpu_threads)
    rng = np.random.default_rng(0)
    rows = []
    for preset_name in ("paper-her2", "cpu-small"):
        config = preset(preset_name)
        torch.manual_seed(0)
        model = DualAttentionModel(config).eval()
        tile_px = config.tile.tile_level0_px
        thumbnail = rng.integers(0, 256, size=(1024, 1024, 3), dtype=np.uint8)
        tissue = np.ones(thumbnail.shape[:2], bool)
        tiles = images_to_tensor(rng.integers(0, 256, size=(config.sampler.n_tiles, tile_px, tile_px, 3),
                                              dtype=np.uint8))
        for device in (torch.device("cpu"), torch.device("cuda")):
            model.to(device)
            on_device = tiles.to(device)
            with torch.inference_mode():
                # scoring's SAM: logits in SAM_TILE_PX tiles (bounded memory); and in one pass, for comparison
                sam_s = _timed(functools.partial(attention_map_of, model, thumbnail, tissue), device, 3)
                sam_one_pass_s = _timed(functools.partial(attention_map_of, model, thumbnail, tissue, tile_px=None),
                                        device, 3)
                agent_s = _timed(functools.partial(model.agent, on_device, deterministic=True), device, 3)
            rows.append({"preset": preset_name, "device": device.type, "sam_1024sq_s": sam_s,
                         "sam_1024sq_one_pass_s": sam_one_pass_s, "sam_tile_px": SAM_TILE_PX,
                         "agent_tiles_s": agent_s, "n_tiles": config.sampler.n_tiles, "tile_px": tile_px})
    # one paper-size joint step on the GPU (4 slides x N tiles of 2048², the paper's batch shape)
    config = preset("paper-her2").with_overrides({"train.sam_warmup_steps": 0})
    torch.manual_seed(0)
    model = DualAttentionModel(config).cuda().train()
    optimizer, _ = build_optimizer(model, config)
    level0 = rng.integers(0, 256, size=(8192, 8192, 3), dtype=np.uint8)
    thumb = level0[::32, ::32].copy()

    def read_tiles(boxes):
        return np.stack([level0[b.y0:b.y0 + b.height, b.x0:b.x0 + b.width] for b in boxes])

    batch = SlideBatch([thumb] * 4, [np.ones(thumb.shape[:2], bool)] * 4, [0, 1, 2, 3], [(8192, 8192)] * 4,
                       [read_tiles] * 4)
    step = TrainingStep(model, config)
    step_s = _timed(lambda: optimise(step, model, optimizer, batch, 0, config, np.random.default_rng(0), 0),
                    torch.device("cuda"), 3)
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows,
              "paper_her2_joint_step_4_slides_s": step_s,
              "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{result['device']}, torch {result['torch']}")
    print(f"| preset | device | SAM over a 1024² thumbnail, {SAM_TILE_PX}-px tiles (s) | the same in one pass (s) | "
          "agent over N tiles (s) | N x tile px |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['device']} | {r['sam_1024sq_s']:.3f} | {r['sam_1024sq_one_pass_s']:.3f} | "
              f"{r['agent_tiles_s']:.3f} | {r['n_tiles']} x {r['tile_px']}² |")
    print(f"paper-her2 joint training step, 4 slides x 10 tiles of 2048², GPU: {step_s:.3f} s; "
          f"peak GPU memory {result['peak_gpu_memory_gib']:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
