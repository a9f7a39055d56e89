"""The overlay PNG and the GeoJSON on a 3.2-gigapixel slide and on a quickstart-size slide (issue 13, item 3).

Two slides written with the project's pyramid writer (``dual_attention.synthetic``): the quickstart's size
(3072², ``write_synthetic_slide``) and 65,536 x 49,152 level-0 px (3.2 GP; thumbnail 2048 x 1536 at 1/32),
whose level 0 is tissue texture cut from a rendered 2048² synthetic HER2 region laid over a blob-shaped
tissue mask (``write_pyramid`` with that strip renderer: rendering 3.2 GP cell by cell would take hours).
Each is scored in process by a random-initialised ``cpu-small`` model with 10 tiles (its 256-px tiles are
8 thumbnail px: the case where the old overlay drew boxes under 2 display px and piled the labels up), then
the overlay is drawn with each tile read at inset size, and the GeoJSON built. Measured per slide: seconds
of each step; the overlay's size, smallest text box, smallest tile box, smallest inset, overlapping numbers;
the GeoJSON's bytes and features. Writes benchmarks/results/overlay.json and the 3.2-GP slide's overlay to
--figures-dir (overlay_3.2gp.png, 256 colours; the overlay's own time is measured before that encoding).

    PYTHONPATH=$PWD nice -n 19 .venv/bin/python benchmarks/bench_overlay.py --scratch /tmp/bench-overlay
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "overlay.json"
BIG_THUMB_ROWS, BIG_THUMB_COLS = 1536, 2048  # x 32 = 49,152 x 65,536 level-0 px


def write_big_slide(path: Path, seed: int) -> dict[str, Any]:
    from scipy import ndimage

    from dual_attention.synthetic import make_layout, render_region, write_pyramid

    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random((BIG_THUMB_ROWS // 8, BIG_THUMB_COLS // 8)), 6)
    yy, xx = np.mgrid[0:field.shape[0], 0:field.shape[1]]
    ellipse = ((yy - field.shape[0] / 2) / (field.shape[0] * 0.42)) ** 2 + \
        ((xx - field.shape[1] / 2) / (field.shape[1] * 0.42)) ** 2
    tissue_coarse = (field > np.quantile(field, 0.35)) & (ellipse < 1)
    tissue = np.kron(tissue_coarse, np.ones((8, 8), bool))  # thumbnail-sized (one cell per 32 level-0 px)
    layout = make_layout("her2", 3, seed, 8192, 8192)
    texture = render_region(layout, 3072, 3072, 2048, 2048)  # the middle of a 3+ slide: tumour and stroma
    width, height = BIG_THUMB_COLS * 32, BIG_THUMB_ROWS * 32

    def render_strip(y0: int, rows: int) -> np.ndarray:
        rows_idx = np.arange(y0, y0 + rows)
        strip = np.tile(texture[rows_idx % 2048], (1, width // 2048, 1))
        inside = np.repeat(tissue[rows_idx // 32], 32, axis=1)
        strip[~inside] = 244
        return strip

    started = time.perf_counter()
    write_pyramid(path, width, height, render_strip, note="bench_overlay 3.2 GP")
    return {"write_s": time.perf_counter() - started, "bytes": path.stat().st_size}


def overlay_metrics(layout: Any) -> dict[str, Any]:
    def overlaps(rects: list) -> int:
        return sum(1 for i, a in enumerate(rects) for b in rects[i + 1:]
                   if min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1]))

    texts = layout.tile_number_boxes + layout.captions + [r for n in layout.glimpse_number_boxes for r in n]
    return {"size_px": list(layout.size), "font_px": layout.font_px,
            "min_text_box_height_px": min(r[3] - r[1] for r in texts),
            "min_tile_box_px": min(min(r[2] - r[0], r[3] - r[1]) for r in layout.tile_boxes),
            "min_inset_px": min(min(r[2] - r[0], r[3] - r[1]) for r in layout.insets),
            "overlapping_tile_numbers": overlaps(layout.tile_number_boxes),
            "overlapping_glimpse_numbers": sum(overlaps(n) for n in layout.glimpse_number_boxes)}


def measure(name: str, slide_path: Path, model: Any, config: Any, figure: Path) -> dict[str, Any]:
    from PIL import Image

    from dual_attention.annotations import dumps, slide_score_geojson
    from dual_attention.overlays import read_tile_previews, slide_score_overlay
    from dual_attention.slides import open_slide, tissue_mask
    from jobs.score import score_slide_path

    started = time.perf_counter()
    score, view, info = score_slide_path(model, config, slide_path, seed=0)
    thumbnail = view.thumbnail
    score_s = time.perf_counter() - started
    started = time.perf_counter()
    with open_slide(slide_path) as slide:
        previews = read_tile_previews(lambda box, px: slide.read_box(box, out_px=(px, px)), score)
    previews_s = time.perf_counter() - started
    started = time.perf_counter()
    width, height = info.dimensions
    image, layout = slide_score_overlay(
        thumbnail, score, config.slide.thumbnail_downsample, class_names=config.class_names, tile_images=previews,
        glimpse_level0_px=config.agent.glimpse_px,
        title=f"{name}: {width:,} x {height:,} px ({width * height / 1e9:.2f} GP); random cpu-small model, "
              f"predicted {score.predicted_label} ({score.confidence:.2f})")
    overlay_s = time.perf_counter() - started
    figure.parent.mkdir(parents=True, exist_ok=True)
    # 256 colours: the committed example stays small (the overlay's flat colours and text survive it).
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(figure, optimize=True)
    started = time.perf_counter()
    mask = tissue_mask(thumbnail, config.slide.tissue_min_area_thumb_px)  # its cost (score reuses its view's mask)
    tissue_mask_s = time.perf_counter() - started
    started = time.perf_counter()
    text = dumps(slide_score_geojson(score, mask, config.class_names, config.slide.thumbnail_downsample,
                                     info.dimensions, config.agent.glimpse_px, slide=slide_path.name))
    geojson_s = time.perf_counter() - started
    kinds: dict[str, int] = {}
    for feature in json.loads(text)["features"]:
        kinds[feature["properties"]["kind"]] = kinds.get(feature["properties"]["kind"], 0) + 1
    return {"slide": name, "level0_px": [width, height], "thumbnail_px": list(thumbnail.shape[:2]),
            "tile_level0_px": config.tile.tile_level0_px, "n_tiles": len(score.tiles),
            "score_s": round(score_s, 2), "tile_previews_s": round(previews_s, 2), "overlay_s": round(overlay_s, 2),
            "geojson_tissue_mask_s": round(tissue_mask_s, 2), "geojson_s": round(geojson_s, 2), "geojson_bytes": len(text), "geojson_features": kinds,
            "overlay_png": str(figure.relative_to(ROOT)) if figure.is_relative_to(ROOT) else str(figure),
            **overlay_metrics(layout)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scratch", default="/tmp/bench-overlay", help="where the slides are written (removed)")
    parser.add_argument("--figures-dir", default=str(ROOT / "benchmarks" / "figures"))
    parser.add_argument("--keep-slides", action="store_true")
    args = parser.parse_args()

    import torch

    from dual_attention.config import preset
    from dual_attention.models import DualAttentionModel
    from dual_attention.synthetic import write_synthetic_slide

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = preset("cpu-small").with_overrides({"sampler.n_tiles": 10, "sampler.n_candidates": 20})
    model = DualAttentionModel(config).eval()
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    figures_dir = Path(args.figures_dir)
    figures_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    try:
        small = scratch / "quickstart-size.tiff"
        started = time.perf_counter()
        write_synthetic_slide(small, "her2", 3, seed=11, width_level0_px=3072, height_level0_px=3072)
        written = {"quickstart": {"write_s": time.perf_counter() - started, "bytes": small.stat().st_size}}
        big = scratch / "big-3.2gp.tiff"
        written["3.2gp"] = write_big_slide(big, seed=5)
        # The 3.2-GP slide's overlay is the committed example; the quickstart-size one stays in the scratch.
        rows = [measure("quickstart", small, model, config, scratch / "overlay_quickstart.png")
                | {"slide_write": written["quickstart"]},
                measure("3.2gp", big, model, config, figures_dir / "overlay_3.2gp.png")
                | {"slide_write": written["3.2gp"]}]
    finally:
        if not args.keep_slides:
            shutil.rmtree(scratch, ignore_errors=True)
    result = {"rows": rows, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "cpu_count": os.cpu_count(), "config": "cpu-small, sampler.n_tiles=10, random weights (seed 0)"}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
