"""Slide-level evaluation of a registered model or checkpoint on a cohort manifest.

``python -m jobs.evaluate --model models:/dual-attention-her2@candidate --manifest cohort/manifest.parquet
--out runs/eval`` (or ``dual-attention evaluate ...``) writes into ``--out``:

- ``predictions.parquet``: one row per scored slide (label, predicted class, class probabilities,
  confidence, tiles, level-0 pixels read and their fraction, wall time per slide and its stages);
- ``tiles.parquet`` and ``glimpses.parquet``: per tile (box, attention, class probabilities) and per glimpse
  (level-0 centre) records;
- ``skipped.parquet``: slides that could not be scored, with the reason (a bad slide is never fatal);
- ``metrics.json``: accuracy, macro F1, AUROC (scikit-learn), and for HER2 the contest's agreement points,
  weighted confidence and combined points (``dual_attention.metrics``);
- ``overlays/*.png``: attention map, tiles and glimpse trails of the first ``--overlays`` slides.

How the work is spread: slides are scored by the cohort job's Ray Data pipeline
(``jobs.score_cohort.scored_batches``: a propose actor for thumbnail, tissue mask, soft attention and
sampling, tile-read tasks (at most ``--num-readers`` at once), an agent actor), so evaluation, the cohort job
and the random-sampling baseline (``sampler="random"``, ``jobs/baselines.py``) score a slide in the one
same way; this module turns the scored rows into its tables, metrics and overlays.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from dual_attention import metrics as slide_metrics_lib
from dual_attention.config import CLASS_NAMES, DualAttentionConfig, add_model_flags
from dual_attention.manifest import ManifestError, read_manifest
from dual_attention.pipeline import SlideScore, TileScore
from dual_attention.slides import Level0Box, open_slide, slide_view
from jobs.runtime.cluster import RaySession

# -- per-slide inputs --------------------------------------------------------------------------------------


@dataclass
class SlideInput:
    """What scoring needs from a slide before any tile is read."""

    thumbnail: np.ndarray  # (h, w, 3) uint8 at 1/downsample of level 0
    tissue_mask: np.ndarray  # (h, w) bool
    level0_dims: tuple[int, int]
    objective_power: float
    thumbnail_s: float  # time to open the slide and make thumbnail + mask


def load_slide_input(path: str, downsample: int, min_tissue_area_thumb_px: int,
                     cache_dir: str | Path | None = None) -> SlideInput:
    """Open a slide and compute its thumbnail and tissue mask (or load them from ``jobs.preprocess``'s
    cache in ``cache_dir``); raises ``SlideError`` for a bad file."""
    started = time.perf_counter()
    if cache_dir is not None:
        from jobs.preprocess import ThumbnailParams, load_or_compute_thumbnail

        params = ThumbnailParams(downsample, min_tissue_area_thumb_px)
        thumbnail, mask, dims = load_or_compute_thumbnail(path, params, cache_dir)
        return SlideInput(thumbnail, mask, (int(dims[0]), int(dims[1])), float("nan"), time.perf_counter() - started)
    with open_slide(path) as slide:
        view = slide_view(slide, downsample, min_tissue_area_thumb_px)
        objective = float(slide.info.objective_power)
    return SlideInput(view.thumbnail, view.tissue_mask, view.level0_dims, objective, time.perf_counter() - started)


# -- metrics ------------------------------------------------------------------------------------------------


def compute_metrics(labels: Sequence[int], predicted: Sequence[int], probabilities: np.ndarray,
                    confidences: Sequence[float], task: str) -> dict[str, Any]:
    """``dual_attention.metrics.slide_metrics`` (the figures training validates with), plus the HER2
    contest table's source for metrics.json."""
    out = slide_metrics_lib.slide_metrics(task, labels, predicted, probabilities, confidences)
    if "agreement_points" in out:
        out["contest_source"] = slide_metrics_lib.HER2_CONTEST_SOURCE
    return out


def metrics_from_predictions(predictions: Sequence[dict[str, Any]], task: str) -> dict[str, Any]:
    names = CLASS_NAMES[task]
    probabilities = np.array([[row[f"prob_{name}"] for name in names] for row in predictions]).reshape(-1, len(names))
    return compute_metrics([row["label"] for row in predictions], [row["predicted_class"] for row in predictions],
                           probabilities, [row["confidence"] for row in predictions], task)


# -- tables ---------------------------------------------------------------------------------------------------


def write_table(rows: Sequence[dict[str, Any]], path: str | Path, schema: pa.Schema | None = None) -> Path:
    """Rows (dicts with the same keys) as a Parquet file; an empty list writes an empty table of ``schema``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(list(rows)) if rows else (schema or pa.schema([])).empty_table()
    pq.write_table(table, path)
    return path


SKIPPED_SCHEMA = pa.schema([("slide_id", pa.string()), ("path", pa.string()), ("label", pa.int64()),
                            ("error", pa.string()), ("reason", pa.string())])


# -- the evaluation loop --------------------------------------------------------------------------------------


@dataclass
class EvaluationReport:
    method: str
    task: str
    predictions: list[dict[str, Any]] = field(default_factory=list)
    tiles: list[dict[str, Any]] = field(default_factory=list)
    glimpses: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0
    out_dir: Path | None = None

    def summary(self) -> dict[str, Any]:
        """Metrics plus the per-slide cost figures (mean wall time, mean fraction of level 0 read)."""
        out = dict(self.metrics)
        out |= {"method": self.method, "task": self.task, "n_skipped": len(self.skipped),
                "elapsed_s": self.elapsed_s}
        if self.predictions:
            out["wall_time_per_slide_s"] = float(np.mean([r["wall_time_s"] for r in self.predictions]))
            out["fraction_level0_read"] = float(np.mean([r["fraction_level0_read"] for r in self.predictions]))
            out["level0_pixels_read_per_slide"] = float(np.mean([r["level0_pixels_read"] for r in self.predictions]))
        return out

    def write(self, out_dir: str | Path) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_table(self.predictions, out_dir / "predictions.parquet")
        write_table(self.tiles, out_dir / "tiles.parquet")
        write_table(self.glimpses, out_dir / "glimpses.parquet")
        write_table(self.skipped, out_dir / "skipped.parquet", SKIPPED_SCHEMA)
        (out_dir / "metrics.json").write_text(json.dumps(self.summary(), indent=2, default=_json_default))
        self.out_dir = out_dir
        return out_dir


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def select_rows(manifest_path: str | Path, folds: Sequence[int] | None = None, task: str | None = None
                ) -> list[dict[str, Any]]:
    """Manifest rows (absolute paths) in the given folds; refuses rows of another task by name."""
    rows = read_manifest(manifest_path).to_pylist()
    if task is not None:
        other = [r["slide_id"] for r in rows if r["task"] != task]
        if other:
            raise ManifestError(manifest_path, f"slides of another task than the model's '{task}': {other[:5]}")
    if folds is not None:
        rows = [r for r in rows if int(r["fold"]) in set(folds)]
    return rows


def evaluate_rows(
    model: Any,
    config: DualAttentionConfig,
    rows: Sequence[dict[str, Any]],
    *,
    sampler: str = "attention",
    seed: int = 0,
    method: str | None = None,
    overlay_dir: str | Path | None = None,
    n_overlays: int = 0,
    num_readers: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> EvaluationReport:
    """Score every row's slide through the cohort job's pipeline (``jobs.score_cohort.scored_batches``: the
    one scoring loop) and gather the predictions, tiles, glimpses and the slides that failed (in
    ``skipped``, with the error's type and message: one bad slide never stops the cohort). Joins Ray when
    initialised, else starts it. ``num_readers`` caps the tile-read tasks at once; overlays are drawn for the
    first ``n_overlays`` rows (a row that fails has none)."""
    from jobs.score_cohort import CohortReport, scored_batches

    method = method or ("dual-attention" if sampler == "attention" else f"{sampler}-sampling")
    report = EvaluationReport(method=method, task=config.task)
    names = config.class_names
    todo = [{"slide_id": str(row["slide_id"]), "path": str(row["path"]), "label": int(row["label"]),
             "input_index": index, "overlay": overlay_dir is not None and index < n_overlays}
            for index, row in enumerate(rows)]
    counts = CohortReport(out_dir=Path(overlay_dir or "."), total=len(todo), skipped=0)
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    with RaySession(log_to_driver=False), tqdm(total=len(todo), desc=f"evaluate ({method})", unit="slide",
                            disable=not progress) as bar:
        if todo:
            for batch in scored_batches(model, config, todo, sampler=sampler, seed=seed, read_tasks=num_readers,
                                        cache_dir=None if cache_dir is None else str(cache_dir)):
                counts.count(batch, time.perf_counter() - started)
                bar.update(len(batch))
                bar.set_postfix_str(f"{counts.failed} failed, {counts.slides_per_hour:.0f} slides/h")
                for result in batch:
                    if result["overlay"]:
                        _write_overlay_of(Path(overlay_dir), rows[result["input_index"]], result, config, method)
                    # The views are drawn: keep only the scores.
                    results.append({k: v for k, v in result.items() if k not in ("thumbnail", "attention_map")})
    for result in sorted(results, key=lambda r: r["input_index"]):  # in the manifest's order, as before
        row = rows[result["input_index"]]
        if result["status"] != "ok":
            error_type, _, reason = str(result["error"]).partition(": ")
            report.skipped.append({"slide_id": result["slide_id"], "path": result["path"],
                                   "label": int(row["label"]), "error": error_type, "reason": reason})
            continue
        report.predictions.append(_prediction(row, result, method, names))
        _add_tile_records(report, result["slide_id"], json.loads(result["tile_records"]), names)
    report.elapsed_s = time.perf_counter() - started
    report.metrics = metrics_from_predictions(report.predictions, config.task)
    return report


def _prediction(row: dict[str, Any], result: dict[str, Any], method: str, names: Sequence[str]) -> dict[str, Any]:
    """A scored slide's predictions row from its agent-stage row (``jobs.score_cohort.AgentStage``)."""
    score_s = result["propose_s"] + result["read_s"] + result["agent_s"]
    prediction = {
        "slide_id": result["slide_id"], "path": result["path"], "label": int(row["label"]), "fold": int(row["fold"]),
        "method": method, "predicted_class": result["predicted_class"],
        "predicted_label": result["predicted_label"], "confidence": result["confidence"],
        "correct": bool(result["predicted_class"] == int(row["label"])), "n_tiles": result["n_tiles"],
        "level0_pixels_read": int(result["level0_pixels_read"]),
        "fraction_level0_read": result["fraction_level0_read"],
        "width_level0_px": result["width_level0_px"], "height_level0_px": result["height_level0_px"],
        "wall_time_s": result["thumbnail_s"] + score_s, "thumbnail_s": result["thumbnail_s"], "score_s": score_s,
    }
    prediction |= {f"prob_{name}": float(result[f"prob_{name}"]) for name in names}
    return prediction


def _add_tile_records(report: EvaluationReport, slide_id: str, tile_records: Sequence[dict[str, Any]],
                      names: Sequence[str]) -> None:
    for record in tile_records:
        tile_index = record["tile_index"]
        tile = {"slide_id": slide_id, "tile_index": tile_index, "x0": record["x0"], "y0": record["y0"],
                "width": record["width"], "height": record["height"],
                "attention_weight": record["attention_weight"], "predicted_class": record["predicted_class"]}
        tile |= {f"prob_{name}": float(record[f"prob_{name}"]) for name in names}
        report.tiles.append(tile)
        trail = zip(record["glimpse_x_level0_px"], record["glimpse_y_level0_px"], strict=True)
        for glimpse_index, (x, y) in enumerate(trail):
            report.glimpses.append({"slide_id": slide_id, "tile_index": tile_index, "glimpse_index": glimpse_index,
                                    "x_level0_px": float(x), "y_level0_px": float(y)})


def _write_overlay_of(overlay_dir: Path, row: dict[str, Any], result: dict[str, Any], config: DualAttentionConfig,
                      method: str) -> None:
    """The overlay PNG of a scored slide whose row carried its views back (``overlay`` set)."""
    from dual_attention.overlays import read_tile_previews, save_slide_score_overlay
    from jobs.score_cohort import overlay_views

    views = overlay_views(result)
    if views is None or result["status"] != "ok":
        return
    thumbnail, attention_map = views
    names = config.class_names
    tiles = [TileScore(level0_box=Level0Box(r["x0"], r["y0"], r["width"], r["height"]),
                       attention_weight=r["attention_weight"], predicted_class=r["predicted_class"],
                       class_probabilities=[r[f"prob_{name}"] for name in names],
                       glimpse_trail_level0=list(zip(r["glimpse_x_level0_px"], r["glimpse_y_level0_px"], strict=True)))
             for r in json.loads(result["tile_records"])]
    score = SlideScore(predicted_class=result["predicted_class"], predicted_label=result["predicted_label"],
                       class_probabilities=[result[f"prob_{name}"] for name in names],
                       confidence=result["confidence"], tiles=tiles, attention_map=attention_map,
                       level0_pixels_read=int(result["level0_pixels_read"]),
                       fraction_level0_read=result["fraction_level0_read"])
    slide_id = str(result["slide_id"])
    title = (f"{slide_id} ({method}): true {names[int(row['label'])]}, predicted {score.predicted_label} "
             f"({score.confidence:.2f}), {100 * score.fraction_level0_read:.2f}% of level 0 read")
    with open_slide(row["path"]) as slide:  # each tile at inset size, from the pyramid level that fits
        previews = read_tile_previews(lambda box, px: slide.read_box(box, out_px=(px, px)), score)
    save_slide_score_overlay(overlay_dir / f"{slide_id}.png", thumbnail, score,
                             config.slide.thumbnail_downsample, title=title, class_names=names, tile_images=previews,
                             glimpse_level0_px=config.agent.glimpse_px)


def evaluate_manifest(
    model_ref: str | Path | None,
    manifest_path: str | Path,
    out_dir: str | Path,
    *,
    model: Any = None,
    config: DualAttentionConfig | None = None,
    folds: Sequence[int] | None = None,
    sampler: str = "attention",
    seed: int = 0,
    num_readers: int = 2,
    n_overlays: int = 4,
    method: str | None = None,
    tracking_uri: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> EvaluationReport:
    """Load the model (``model_ref``: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a checkpoint path;
    or pass ``model`` and ``config``), score the manifest's slides through the cohort pipeline
    (``evaluate_rows``) and write the outputs into ``out_dir``."""
    if model is None:
        from jobs.runtime.tracking import load_registered_model

        if model_ref is None:
            raise ValueError("evaluate_manifest needs model_ref or model and config")
        model, config, _ = load_registered_model(model_ref, tracking_uri=tracking_uri)
    if config is None:
        raise ValueError("evaluate_manifest: a model passed directly needs its config")
    rows = select_rows(manifest_path, folds, task=config.task)
    out_dir = Path(out_dir)
    report = evaluate_rows(model, config, rows, sampler=sampler, seed=seed, method=method,
                           overlay_dir=out_dir / "overlays", n_overlays=n_overlays, num_readers=num_readers,
                           cache_dir=cache_dir, progress=progress)
    report.write(out_dir)
    return report


# -- command line ------------------------------------------------------------------------------------------------


def fold_list(text: str | None) -> list[int] | None:
    """``--folds 0,1`` -> [0, 1]; empty -> None (all folds)."""
    if not text:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"folds must be comma-separated integers, got {text!r}") from None


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog or "python -m jobs.evaluate", description=__doc__.split("\n\n")[0])
    add_model_flags(parser)
    parser.add_argument("--manifest", required=True, help="cohort manifest.parquet")
    parser.add_argument("--out", required=True, help="output folder (Parquet tables, metrics.json, overlays/)")
    parser.add_argument("--folds", type=fold_list, default=None, help="only these folds, e.g. 0 or 0,1 (default: all)")
    parser.add_argument("--sampler", choices=("attention", "random"), default="attention",
                        help="tile sampler: the SAM's (default) or the random Gumbel baseline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-readers", type=int, default=2, help="tile-read tasks at once")
    parser.add_argument("--overlays", type=int, default=4, help="overlay PNGs for the first N slides")
    parser.add_argument("--cache-dir", default=None,
                        help="thumbnail/tissue-mask cache of jobs.preprocess (default: compute, no cache)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads (1 is much faster on small machines shared with other jobs)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def set_torch_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--torch-threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        set_torch_threads(args.torch_threads)
        report = evaluate_manifest(args.model, args.manifest, args.out, folds=args.folds, sampler=args.sampler,
                                   seed=args.seed, num_readers=args.num_readers, n_overlays=args.overlays,
                                   tracking_uri=args.mlflow_uri, cache_dir=args.cache_dir,
                                   progress=not args.quiet)
    except (ManifestError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_report(report)
    return 0 if report.predictions else 1


def print_report(report: EvaluationReport) -> None:
    summary = report.summary()
    shown = {k: v for k, v in summary.items() if k != "contest_source"}
    for key, value in shown.items():
        if isinstance(value, float) and math.isfinite(value):
            value = f"{value:.4g}"
        print(f"{key}: {value}")
    for skipped in report.skipped:
        print(f"skipped {skipped['slide_id']} ({skipped['path']}): {skipped['error']}: {skipped['reason']}",
              file=sys.stderr)
    if report.out_dir is not None:
        print(f"outputs in {report.out_dir}")


if __name__ == "__main__":
    sys.exit(main())
