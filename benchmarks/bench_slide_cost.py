"""What one slide costs to score, before and after issue 12 ("speed to the floor").

* ``sam``: the SAM's attention map over a 1536 x 2048 thumbnail (a ~3.2-gigapixel slide at 1/32), one
  thread, each variant in a fresh subprocess: peak RSS (VmHWM), CPU seconds (the process's, which a
  shared machine does not inflate) and wall seconds. ``one-pass`` is the path
  before issue 12 (``no_grad``, full-resolution activations); ``tiled-N`` is scoring's path now
  (``inference_mode``, logits in N x N tiles with a receptive-field halo, channels-last, running-max
  pool); ``-nchw`` and ``-maxpool2d`` switch one or both of the two speed-ups off.
* ``thumbnail``: ``Slide.thumbnail(32)`` of a synthetic single-level tiled TIFF 16,384 px wide, through the
  reader before issue 12 (bands spanning the full level width, copied here) and the chunked reader,
  each in a fresh subprocess: peak RSS and seconds; the two thumbnails are checked equal.

    PYTHONPATH=$PWD nice -n 19 .venv/bin/python benchmarks/bench_slide_cost.py
    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_slide_cost.py --only thumbnail --slide-height 4500

Writes benchmarks/results/slide_cost.json and prints a markdown table (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's dual_attention, also when run as a plain script
RESULTS = ROOT / "benchmarks" / "results" / "slide_cost.json"
THUMB_ROWS, THUMB_COLS = 1536, 2048
SAM_VARIANTS = ["one-pass", "tiled-128", "tiled-256", "tiled-512", "tiled-1024", "tiled-128-nchw",
                "tiled-128-maxpool2d", "tiled-128-nchw-maxpool2d"]


def vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# -- children (one measurement per fresh process) ---------------------------------------------------------


def child_sam(preset_name: str, variant: str) -> dict[str, Any]:
    import numpy as np
    import torch

    from dual_attention.config import preset
    from dual_attention.models import DualAttentionModel, SoftAttentionNet
    from dual_attention.pipeline import attention_map_of

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = DualAttentionModel(preset(preset_name)).eval()
    rng = np.random.default_rng(0)
    thumbnail = rng.integers(0, 256, size=(THUMB_ROWS, THUMB_COLS, 3), dtype=np.uint8)
    mask = np.zeros((THUMB_ROWS, THUMB_COLS), bool)
    mask[100:-100, 150:-150] = True
    SoftAttentionNet.inference_channels_last = "-nchw" not in variant
    SoftAttentionNet.inference_running_max = "-maxpool2d" not in variant
    attention_map_of(model, thumbnail[:64, :64], mask[:64, :64])  # warm-up outside the timing (small)
    baseline = vm_hwm_bytes()
    started, cpu_started = time.perf_counter(), time.process_time()
    if variant == "one-pass":
        with torch.no_grad():
            attention = attention_map_of(model, thumbnail, mask, tile_px=None)
    else:
        with torch.inference_mode():
            attention = attention_map_of(model, thumbnail, mask, tile_px=int(variant.split("-")[1]))
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    peak = vm_hwm_bytes()
    return {"preset": preset_name, "variant": variant, "seconds": round(seconds, 2),
            "cpu_seconds": round(cpu_seconds, 2), "peak_rss_bytes": peak,
            "peak_over_baseline_bytes": peak - baseline, "attention_sum": float(attention.sum()),
            "attention_digest": [float(v) for v in attention[::256, ::256].flatten()[:16]]}


def legacy_band_thumbnail(slide: Any, downsample: int) -> Any:
    """Slide.thumbnail before issue 12: bands of whole thumbnail rows, each spanning the level's width."""
    import numpy as np
    from PIL import Image

    from dual_attention.slides import _THUMBNAIL_BAND_LEVEL_PX as band_px

    rows, cols = slide.thumbnail_shape(downsample)
    level = slide._osr.get_best_level_for_downsample(downsample)
    level_downsample = slide.info.level_downsamples[level]
    level_width, level_height = slide.info.level_dimensions[level]
    if level_width * level_height <= band_px**2:
        region = slide._read_rgb((0, 0), level, (level_width, level_height), what="thumbnail")
        return np.asarray(Image.fromarray(region).resize((cols, rows), Image.Resampling.BOX))
    out = np.empty((rows, cols, 3), dtype=np.uint8)
    band_rows = max(1, int(band_px * level_downsample // downsample))
    for row0 in range(0, rows, band_rows):
        row1 = min(rows, row0 + band_rows)
        y0_level0 = row0 * downsample
        band_height_level = max(1, round((row1 - row0) * downsample / level_downsample))
        band_height_level = min(band_height_level, level_height - int(y0_level0 / level_downsample))
        band = slide._read_rgb((0, y0_level0), level, (level_width, max(1, band_height_level)), what="thumbnail")
        out[row0:row1] = np.asarray(Image.fromarray(band).resize((cols, row1 - row0), Image.Resampling.BOX))
    return out


def child_thumbnail(path: str, variant: str) -> dict[str, Any]:
    import hashlib

    from dual_attention.slides import open_slide

    with open_slide(path) as slide:
        baseline = vm_hwm_bytes()
        started, cpu_started = time.perf_counter(), time.process_time()
        thumbnail = legacy_band_thumbnail(slide, 32) if variant == "full-width bands" else slide.thumbnail(32)
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        peak = vm_hwm_bytes()
        dims = slide.dimensions
    return {"variant": variant, "slide_px": list(dims), "seconds": round(seconds, 2),
            "cpu_seconds": round(cpu_seconds, 2), "peak_rss_bytes": peak,
            "peak_over_baseline_bytes": peak - baseline, "thumbnail_shape": list(thumbnail.shape),
            "thumbnail_sha256": hashlib.sha256(thumbnail.tobytes()).hexdigest()}


def write_wide_tiff(path: Path, width: int, height: int) -> None:
    """A single-level tiled TIFF with structure at every scale, written in strips of rows."""
    import numpy as np
    import tifffile

    def tiles():
        for row0 in range(0, height, 256):
            rows = np.arange(row0, min(height, row0 + 256), dtype=np.uint32)[:, None]
            cols = np.arange(width, dtype=np.uint32)[None, :]
            strip = np.empty((256, width, 3), dtype=np.uint8)  # full tiles: the last is padded
            strip[:len(rows), :, 0] = (cols * 7 + rows * 3) % 251
            strip[:len(rows), :, 1] = ((cols // 37) * 29 + (rows // 23) * 13) % 256
            strip[:len(rows), :, 2] = (cols ^ rows) % 256
            for col0 in range(0, width, 256):
                yield strip[:, col0:col0 + 256]

    tifffile.imwrite(path, tiles(), shape=(height, width, 3), dtype=np.uint8, tile=(256, 256),
                     compression="zlib", photometric="rgb")


# -- parent ------------------------------------------------------------------------------------------------


def run_child(*args: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def gib(value: int) -> str:
    return f"{value / 2**30:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["sam", "thumbnail"], default=None)
    parser.add_argument("--presets", nargs="+", default=["cpu-small", "paper-her2"])
    parser.add_argument("--sam-variants", nargs="+", default=SAM_VARIANTS)
    parser.add_argument("--slide-width", type=int, default=16_384)
    parser.add_argument("--slide-height", type=int, default=8_192)
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per SAM variant (each a fresh process); the one with the least CPU time is kept")
    parser.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = child_sam(*rest) if kind == "sam" else child_thumbnail(*rest)
        print(json.dumps(result))
        return

    results: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results["machine"] = {"python": platform.python_version(), "processor": platform.processor(),
                          "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    if args.only in (None, "sam"):
        rows = []
        for preset_name in args.presets:
            for variant in args.sam_variants:
                runs = [run_child("sam", preset_name, variant) for _ in range(max(1, args.repeats))]
                row = min(runs, key=lambda r: r["cpu_seconds"])  # a shared machine only ever adds time
                row["cpu_seconds_all_runs"] = [r["cpu_seconds"] for r in runs]
                rows.append(row)
                print(f"| {preset_name} | {variant} | {gib(row['peak_rss_bytes'])} | "
                      f"{gib(row['peak_over_baseline_bytes'])} | {row['cpu_seconds']} | {row['seconds']} |", flush=True)
        # Rows of earlier runs for other (preset, variant) pairs are kept, so variants can be rerun alone.
        fresh = {(r["preset"], r["variant"]) for r in rows}
        kept = [r for r in results.get("sam", {}).get("rows", []) if (r["preset"], r["variant"]) not in fresh]
        results["sam"] = {"thumbnail_px": [THUMB_ROWS, THUMB_COLS], "threads": 1, "repeats": args.repeats,
                          "rows": kept + rows}
    if args.only in (None, "thumbnail"):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "wide.tiff"
            started = time.perf_counter()
            write_wide_tiff(path, args.slide_width, args.slide_height)
            print(f"wrote {args.slide_width}x{args.slide_height} in {time.perf_counter() - started:.1f} s",
                  flush=True)
            rows = [run_child("thumbnail", str(path), v) for v in ("full-width bands", "chunked")]
        for row in rows:
            print(f"| {row['variant']} | {row['slide_px']} | {gib(row['peak_rss_bytes'])} | "
                  f"{gib(row['peak_over_baseline_bytes'])} | {row['cpu_seconds']} | {row['seconds']} |")
        rows_equal = rows[0]["thumbnail_sha256"] == rows[1]["thumbnail_sha256"]
        print("thumbnails identical:", rows_equal)
        results["thumbnail"] = {"rows": rows, "identical": rows_equal}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
