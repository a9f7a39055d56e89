"""Score one slide locally, without Ray or a server: JSON on stdout (or a file) and an overlay PNG.

    python -m jobs.score --model models:/dual-attention-her2@candidate --slide path/to/slide.svs
    dual-attention score --model runs/quickstart/checkpoint --slide slide.tiff --overlay overlay.png
    dual-attention score --model runs/quickstart/checkpoint --slide slide.tiff --geojson slide.geojson

Tiles are read straight from the slide with OpenSlide; the result equals the scoring service's for the
same model and seed. ``--overlay`` draws the overlay PNG (``dual_attention.overlays``; its insets are the
tiles read again at inset size); ``--geojson`` writes the tissue outline, attention regions, tiles and
glimpses as a QuPath-importable FeatureCollection in level-0 pixels (``dual_attention.annotations``). The
JSON's ``"profile"`` gives the milliseconds of each stage (open, thumbnail, tissue_mask, soft_attention,
sampling, tile_reads, agent, aggregation) and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dual_attention.config import add_model_flags
from dual_attention.pipeline import ScoringError, score_slide_path, slide_score_record
from dual_attention.profiling import StageTimer, one_malloc_arena
from dual_attention.slides import SlideError, calibration_dict, open_slide


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog or "python -m jobs.score", description=__doc__.split("\n\n")[0])
    add_model_flags(parser)
    parser.add_argument("--slide", required=True, help="slide file (any format OpenSlide reads)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overlay", default=None, help="write the overlay PNG here (attention, tiles, glimpses)")
    parser.add_argument("--geojson", default=None,
                        help="write a QuPath-importable GeoJSON here (tissue, attention, tiles, glimpses; level-0 px)")
    parser.add_argument("--out", default=None, help="write the JSON here instead of stdout")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    from jobs.runtime.tracking import load_model_for_cli

    one_malloc_arena()  # before scoring's threads allocate: peak RSS bounded by the slide's live arrays

    loaded = load_model_for_cli(args.model, args.mlflow_uri)
    if loaded is None:
        return 2
    model, config, meta = loaded
    started = time.perf_counter()
    timer = StageTimer()
    try:
        score, view, info = score_slide_path(model, config, args.slide, args.seed, timer=timer)
    except SlideError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except ScoringError as error:
        print(f"error: {args.slide}: {error}", file=sys.stderr)
        return 1
    result = {"slide": str(args.slide), "model": {k: meta.get(k) for k in ("name", "version", "alias", "source")},
              "config_digest": config.digest(), "seconds": round(time.perf_counter() - started, 3),
              "level0_dimensions": list(info.dimensions), "calibration": calibration_dict(info),
              "class_names": list(config.class_names),
              **slide_score_record(score, config.class_names), "profile": timer.as_dict()}
    if args.overlay:
        from dual_attention.overlays import read_tile_previews, save_slide_score_overlay

        with open_slide(args.slide) as slide:  # the insets: each tile at high power, from the pyramid level that fits
            previews = read_tile_previews(lambda box, px: slide.read_box(box, out_px=(px, px)), score)
        save_slide_score_overlay(args.overlay, view.thumbnail, score, config.slide.thumbnail_downsample,
                                 title=f"{Path(args.slide).name}: {score.predicted_label} ({score.confidence:.2f})",
                                 class_names=config.class_names, tile_images=previews,
                                 glimpse_level0_px=config.agent.glimpse_px)
        result["overlay_png"] = str(Path(args.overlay).resolve())
    if args.geojson:
        from dual_attention.annotations import dumps, slide_score_geojson

        collection = slide_score_geojson(score, view.tissue_mask, config.class_names, config.slide.thumbnail_downsample,
                                         info.dimensions, config.agent.glimpse_px, slide=Path(args.slide).name,
                                         model={k: meta.get(k) for k in ("name", "version")})
        Path(args.geojson).parent.mkdir(parents=True, exist_ok=True)
        Path(args.geojson).write_text(dumps(collection))
        result["geojson"] = str(Path(args.geojson).resolve())
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
