"""What one slide costs to score, before and after issue 12 ("speed to the floor").

* ``sam``: the SAM's attention map over a 1536 x 2048 thumbnail (a ~3.2-gigapixel slide at 1/32), one
  thread, each variant in a fresh subprocess: peak RSS (VmHWM), CPU seconds (the process's, which a
  shared machine does not inflate) and wall seconds. ``one-pass`` is the path
  before issue 12 (``no_grad``, full-resolution activations); ``tiled-N`` is scoring's path now
  (``inference_mode``, logits in N x N tiles with a receptive-field halo, channels-last, running-max
  pool); ``-nchw`` and ``-maxpool2d`` switch one or both of the two speed-ups off.
* ``score``: warm scoring (model loaded, one warm-up slide first) of synthetic pyramid slides from 10 MP to
  3.2 GP, dense and sparse tissue, written with the project's own writer (``synthetic.write_pyramid``) and
  cached in ``--slide-dir``: per-stage milliseconds (``jobs.score`` profile, median of ``--score-repeats``),
  process CPU seconds, peak RSS, and each read stage beside its floor (its pixels ÷ the libjpeg-turbo decode
  rate measured in the same process on the slide's own pixels); tile reads also beside the pixels of every
  level-0 JPEG tile their boxes touch (a tile is decoded whole, so that is what any reader must decode).
* ``thumbnail``: ``Slide.thumbnail(32)`` of a synthetic single-level tiled TIFF 16,384 px wide, through the
  reader before issue 12 (bands spanning the full level width, copied here) and the chunked reader,
  each in a fresh subprocess: peak RSS and seconds; the two thumbnails are checked equal.

    PYTHONPATH=$PWD nice -n 19 .venv/bin/python benchmarks/bench_slide_cost.py
    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_slide_cost.py --only thumbnail --slide-height 4500
    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_slide_cost.py --only score

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


# Slides of the ``score`` section: name -> (level-0 width, height, tissue block side or None for dense).
# Dense slides are one synthetic layout over the whole slide (35-60% tissue); a sparse slide is glass with
# one synthetic layout of ``block`` x ``block`` px in it (the held-out 3.2-GP slide of issue 12 was sparse).
COST_SLIDES: dict[str, tuple[int, int, int | None]] = {
    "10MP-dense": (3_584, 2_816, None),
    "100MP-dense": (11_264, 8_960, None),
    "1GP-dense": (36_864, 28_672, None),
    "3.2GP-sparse": (65_536, 49_152, 12_288),
}


def write_cost_slide(path: Path, width: int, height: int, block: int | None, seed: int = 12) -> None:
    """A her2 3+ synthetic pyramid; ``block`` set: tissue only in a block x block square at (width/4, height/4)."""
    import numpy as np

    from dual_attention import synthetic

    block_w, block_h = (width, height) if block is None else (block, block)
    layout = synthetic.make_layout("her2", 3, seed, block_w, block_h)
    x_off, y_off = (0, 0) if block is None else (width // 4, height // 4)
    glass = synthetic.render_region(layout, -4 * synthetic.TILE_PX, -4 * synthetic.TILE_PX, 1, 1)[0, 0]

    def render_strip(y0: int, rows: int) -> np.ndarray:
        strip = np.empty((rows, width, 3), np.uint8)
        strip[:] = glass
        top, bottom = max(y0, y_off), min(y0 + rows, y_off + block_h)
        for x0 in range(x_off, x_off + block_w, synthetic.RENDER_CHUNK_PX) if bottom > top else ():
            cols = min(synthetic.RENDER_CHUNK_PX, x_off + block_w - x0)
            strip[top - y0:bottom - y0, x0:x0 + cols] = synthetic.render_region(
                layout, x0 - x_off, top - y_off, cols, bottom - top)
        return strip

    tmp = path.with_suffix(".partial")
    synthetic.write_pyramid(tmp, width, height, render_strip, note="bench_slide_cost")
    tmp.rename(path)


def jpeg_decode_mp_per_cpu_s(region: Any) -> float:
    """libjpeg-turbo's decode rate (through Pillow) on ``region`` encoded as the writer encodes tiles."""
    import io

    from PIL import Image

    from dual_attention.synthetic import JPEG_QUALITY

    buffer = io.BytesIO()
    Image.fromarray(region).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    data = buffer.getvalue()
    best = float("inf")
    for _ in range(5):
        started = time.process_time()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        best = min(best, time.process_time() - started)
    return region.shape[0] * region.shape[1] / 1e6 / max(best, 1e-6)


def child_score(path: str, preset_name: str, threads: str, repeats: str) -> dict[str, Any]:

    import tifffile
    import torch

    from dual_attention.config import preset
    from dual_attention.models import DualAttentionModel
    from dual_attention.profiling import StageTimer, one_malloc_arena
    from dual_attention.slides import open_slide
    from jobs.score import score_slide_path

    one_malloc_arena()  # as `dual-attention score` starts (jobs.score.main)
    torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    config = preset(preset_name)
    model = DualAttentionModel(config).eval()
    score_slide_path(model, config, path, seed=0)  # warm-up: first-call costs are not a slide's
    runs = []
    score = None
    for _ in range(int(repeats)):
        del score  # the last score (its attention map) goes before the next: the peak is one slide's
        timer = StageTimer()
        started, cpu_started = time.perf_counter(), time.process_time()
        score, _, _ = score_slide_path(model, config, path, seed=0, timer=timer)
        runs.append({"wall_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu_started,
                     "stages_ms": dict(timer.ms)})
    median_run = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
    tile_px = config.tile.tile_level0_px
    with open_slide(path) as slide:
        level = slide.thumbnail_level(config.slide.thumbnail_downsample)
        level_w, level_h = slide.info.level_dimensions[level]
        first = score.tiles[0].level0_box
        region = slide.read_box(first)
    decode_rate = jpeg_decode_mp_per_cpu_s(region)
    # A JPEG tile is decoded whole: a box off the tile grid costs every level-0 tile it touches.
    with tifffile.TiffFile(path) as tif:
        tile_w, tile_h = tif.pages[0].tilewidth, tif.pages[0].tilelength
    touched_mp = sum(
        (((b.x0 + b.width - 1) // tile_w - b.x0 // tile_w + 1) * ((b.y0 + b.height - 1) // tile_h - b.y0 // tile_h + 1))
        * tile_w * tile_h for b in (t.level0_box for t in score.tiles)) / 1e6
    thumbnail_mp = level_w * level_h / 1e6
    tiles_mp = len(score.tiles) * tile_px * tile_px / 1e6
    stages = median_run["stages_ms"]
    return {"slide": Path(path).stem, "preset": preset_name, "threads": int(threads), "repeats": int(repeats),
            "wall_s": round(median_run["wall_s"], 3), "cpu_s": round(median_run["cpu_s"], 3),
            "wall_s_all_runs": [round(r["wall_s"], 3) for r in runs],
            "stages_ms": {k: round(v, 1) for k, v in stages.items()},
            "peak_rss_bytes": vm_hwm_bytes(), "jpeg_decode_mp_per_cpu_s": round(decode_rate, 1),
            "thumbnail_level_mp": round(thumbnail_mp, 2), "tiles_mp": round(tiles_mp, 2),
            "thumbnail_floor_ms": round(thumbnail_mp / decode_rate * 1000, 1),
            "tile_reads_floor_ms": round(tiles_mp / decode_rate * 1000, 1),
            "thumbnail_over_floor": round(stages["thumbnail"] / (thumbnail_mp / decode_rate * 1000), 2),
            "tile_reads_over_floor": round(stages["tile_reads"] / (tiles_mp / decode_rate * 1000), 2),
            "level0_tile_px": [tile_w, tile_h], "touched_tiles_mp": round(touched_mp, 2),
            "tile_reads_decode_floor_ms": round(touched_mp / decode_rate * 1000, 1),
            "tile_reads_over_decode_floor": round(stages["tile_reads"] / (touched_mp / decode_rate * 1000), 2),
            "predicted_class": score.predicted_class, "level0_boxes": [list(t.level0_box.as_tuple()) for t in score.tiles]}


def child_sliding_window(path: str, threads: str) -> dict[str, Any]:
    """The sliding-window baseline at the paper's sizes (224² patches at 20x into a width-64 ResNet18,
    untrained: the cost does not depend on the weights) on one slide, warm (one batch first), in-process."""
    import torch

    from dual_attention.slides import open_slide, tissue_mask
    from dual_attention.sliding_window import (
        ResNet18,
        paper_config,
        score_slide_sliding_window,
        slide_patch_reader,
    )

    torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    window = paper_config("her2")
    resnet = ResNet18(4, window.resnet_width).eval()
    with torch.no_grad():
        resnet(torch.rand(window.batch_size, 3, window.patch_px, window.patch_px))
    started, cpu_started = time.perf_counter(), time.process_time()
    with open_slide(path) as slide, torch.no_grad():
        low_power = slide.thumbnail(window.mask_downsample)
        tissue = tissue_mask(low_power, min_area_thumb_px=4)
        score = score_slide_sliding_window(resnet, low_power, slide.dimensions, slide.info.objective_power,
                                           slide_patch_reader(slide, window), window, tissue)
    return {"slide": Path(path).stem, "wall_s": round(time.perf_counter() - started, 2),
            "cpu_s": round(time.process_time() - cpu_started, 2), "patches": score.n_patches,
            "fraction_level0_read": round(score.fraction_level0_read, 4),
            "timings_s": {k: round(v, 2) for k, v in score.timings_s.items()}, "peak_rss_bytes": vm_hwm_bytes()}


# -- parent ------------------------------------------------------------------------------------------------


def run_child(*args: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_score_section(args: argparse.Namespace) -> dict[str, Any]:
    slide_dir = Path(args.slide_dir)
    slide_dir.mkdir(parents=True, exist_ok=True)
    load_at_start = os.getloadavg()
    rows = []
    print("| slide | preset | warm wall s | CPU s | thumbnail ms (floor) | tissue mask ms | soft attention ms | "
          "tile reads ms (box floor / touched-tile floor) | agent ms | peak RSS GiB |", flush=True)
    for name in args.slides:
        width, height, block = COST_SLIDES[name]
        path = slide_dir / f"{name}.tiff"
        if not path.exists():
            started = time.perf_counter()
            write_cost_slide(path, width, height, block)
            print(f"wrote {name} ({width}x{height}) in {time.perf_counter() - started:.0f} s", flush=True)
        for preset_name in args.presets:
            row = run_child("score", str(path), preset_name, str(args.threads), str(args.score_repeats))
            row["level0_px"] = [width, height]
            row["gigapixels"] = round(width * height / 1e9, 3)
            rows.append(row)
            st = row["stages_ms"]
            print(f"| {name} | {preset_name} | {row['wall_s']} | {row['cpu_s']} | {st['thumbnail']:.0f} "
                  f"({row['thumbnail_floor_ms']:.0f}) | {st['tissue_mask']:.0f} | {st['soft_attention']:.0f} | "
                  f"{st['tile_reads']:.0f} ({row['tile_reads_floor_ms']:.0f} / {row['tile_reads_decode_floor_ms']:.0f}) | "
                  f"{st['agent']:.0f} | "
                  f"{gib(row['peak_rss_bytes'])} |", flush=True)
    ratios = {}
    for preset_name in args.presets:
        by_slide = {r["slide"]: r for r in rows if r["preset"] == preset_name}
        if "3.2GP-sparse" in by_slide and "100MP-dense" in by_slide:
            ratios[preset_name] = round(by_slide["3.2GP-sparse"]["peak_rss_bytes"]
                                        / by_slide["100MP-dense"]["peak_rss_bytes"], 3)
    print("peak RSS 3.2 GP / 100 MP:", ratios)
    # The sliding window on the same >= 1-GP slides, in the same run: its wall time over dual attention's
    # (paper sizes both).
    window_rows = []
    for name in args.window_slides:
        row = run_child("sliding-window", str(slide_dir / f"{name}.tiff"), str(args.threads))
        paper = next((r for r in rows if r["slide"] == name and r["preset"] == "paper-her2"), None)
        row["dual_attention_paper_wall_s"] = paper["wall_s"] if paper else None
        row["sliding_window_over_dual_attention"] = round(row["wall_s"] / paper["wall_s"], 1) if paper else None
        window_rows.append(row)
        print(f"sliding window, paper sizes, {name}: {row['wall_s']} s ({row['patches']} patches, "
              f"{100 * row['fraction_level0_read']:.1f}% of level 0) = {row['sliding_window_over_dual_attention']}x "
              "dual attention", flush=True)
    return {"threads": args.threads, "repeats": args.score_repeats, "load_average_start": load_at_start,
            "load_average_end": os.getloadavg(), "rows": rows, "rss_3_2gp_over_100mp": ratios,
            "sliding_window": window_rows}


def gib(value: int) -> str:
    return f"{value / 2**30:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["sam", "thumbnail", "score"], default=None)
    parser.add_argument("--slides", nargs="+", default=list(COST_SLIDES), choices=list(COST_SLIDES))
    parser.add_argument("--slide-dir", default=str(Path(tempfile.gettempdir()) / "dual-attention-slide-cost"),
                        help="where the score section's slides are written once and reused")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the score section")
    parser.add_argument("--score-repeats", type=int, default=3)
    parser.add_argument("--window-slides", nargs="*", default=["1GP-dense", "3.2GP-sparse"],
                        choices=list(COST_SLIDES), help="slides the sliding window also scores (paper sizes)")
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
        child = {"sam": child_sam, "thumbnail": child_thumbnail, "score": child_score,
                 "sliding-window": child_sliding_window}[kind]
        result = child(*rest)
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
    if args.only == "score":  # minutes of slide writing the first time: asked for by name only
        results["score"] = run_score_section(args)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
