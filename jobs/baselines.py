"""The two baselines of the paper's cohort study, on the same manifests and outputs as ``jobs.evaluate``.

``python -m jobs.baselines random --model REF --manifest M --out DIR``
    Random sampling: the same trained agent, but its tiles are drawn uniformly over tissue by Gumbel-max
    (without replacement, seeded) instead of by the soft-attention model. Runs ``jobs.evaluate`` with
    ``sampler="random"``: the cohort job's pipeline (``jobs.score_cohort``) with the sampler replaced.

``python -m jobs.baselines sliding-window --manifest M --train-folds 1,2,3 --test-folds 0 --out DIR``
    Sliding window (``dual_attention.sliding_window``): every patch with enough stained tissue is scored
    by a ResNet18 trained from scratch on patches of the training folds (slide label as patch label), and
    the top 15 patches make the slide score. ``--preset cpu-small`` (default) uses 64² patches at 20x and a
    width-32 ResNet18 so it trains in minutes on 2 cores; ``--preset paper`` is the paper's 224² at 20x.
    Patches are read through the Ray tile plane; slides are scored in sequence (one model copy), their
    low-power views prefetched by threads.

Both write ``predictions.parquet`` (same columns as ``jobs.evaluate``: wall time per slide and fraction of
level-0 pixels read included), ``skipped.parquet``, ``metrics.json``; the sliding window also writes
``tiles.parquet`` (its top-k patches per slide) and ``sliding_window_resnet18.pt``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dual_attention.config import CLASS_NAMES, NUM_CLASSES, add_model_flags
from dual_attention.manifest import ManifestError
from dual_attention.pipeline import slide_seed
from dual_attention.slides import SlideError, open_slide, slide_view
from dual_attention.sliding_window import (
    ReadPatches,
    ResNet18,
    SlidingWindowConfig,
    cpu_small_config,
    paper_config,
    patch_grid,
    sample_training_patches,
    score_slide_sliding_window,
    train_patch_classifier,
)
from jobs.evaluate import (
    EvaluationReport,
    evaluate_manifest,
    fold_list,
    metrics_from_predictions,
    print_report,
    select_rows,
    set_torch_threads,
)
from jobs.runtime.cluster import RaySession

SLIDING_WINDOW_MODEL_FILE = "sliding_window_resnet18.pt"

# -- random sampling ------------------------------------------------------------------------------------------


def run_random_baseline(model_ref: str | Path | None, manifest_path: str | Path, out_dir: str | Path,
                        **kwargs: Any) -> EvaluationReport:
    """The trained dual attention agent on tiles drawn uniformly over tissue (Gumbel-max)."""
    return evaluate_manifest(model_ref, manifest_path, out_dir, sampler="random", method="random-sampling", **kwargs)


# -- sliding window -------------------------------------------------------------------------------------------


@dataclass
class LowPowerView:
    rgb: np.ndarray  # the slide at 1/mask_downsample of level 0
    tissue: np.ndarray
    level0_dims: tuple[int, int]
    objective_power: float
    load_s: float


def load_low_power_view(path: str, config: SlidingWindowConfig) -> LowPowerView:
    started = time.perf_counter()
    with open_slide(path) as slide:
        view = slide_view(slide, config.mask_downsample, min_tissue_area_thumb_px=4)
        objective = float(slide.info.objective_power)
    return LowPowerView(view.thumbnail, view.tissue_mask, view.level0_dims, objective, time.perf_counter() - started)


def pool_patch_reader(pool: Any, slide_path: str, config: SlidingWindowConfig) -> ReadPatches:
    """``ReadPatches`` through the tile plane: level-0 boxes rendered at ``config.patch_px``² (the pool picks
    the pyramid level), raising the first ``SlideError``."""
    from jobs.runtime.tile_plane import TileRequest

    side = config.patch_px

    def read(boxes: Sequence[Any]) -> np.ndarray:
        out = np.empty((len(boxes), side, side, 3), dtype=np.uint8)
        for i, result in enumerate(pool.iter_read([TileRequest(slide_path, box, out_px=(side, side))
                                                   for box in boxes])):
            if isinstance(result, SlideError):
                raise result
            out[i] = result
        return out

    return read


def _prefetch(rows: Sequence[dict[str, Any]], config: SlidingWindowConfig, executor: ThreadPoolExecutor
              ) -> list[Future[LowPowerView]]:
    return [executor.submit(load_low_power_view, str(row["path"]), config) for row in rows]


def train_sliding_window(rows: Sequence[dict[str, Any]], task: str, config: SlidingWindowConfig, pool: Any,
                         progress: bool = True) -> tuple[ResNet18, dict[str, Any]]:
    """Read ``config.train_patches_per_slide`` random patches from each training slide (bad slides are
    skipped and listed) and train the ResNet18 on them."""
    patches, labels, skipped = [], [], []
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="low-power") as executor:
        futures = _prefetch(rows, config, executor)
        for row, future in tqdm(zip(rows, futures, strict=True), total=len(rows), desc="sliding-window patches",
                                unit="slide", disable=not progress):
            try:
                view = future.result()
                grid = patch_grid(view.rgb, view.level0_dims, view.objective_power, config, view.tissue)
                if not grid.level0_boxes:
                    raise ValueError("no patch with tissue above sliding_window.min_tissue_fraction")
                slide_rng = np.random.default_rng([config.seed, slide_seed(config.seed, str(row["slide_id"]))])
                chosen = sample_training_patches(grid, pool_patch_reader(pool, str(row["path"]), config),
                                                 config.train_patches_per_slide, slide_rng)
            except Exception as error:  # noqa: BLE001 - a bad training slide is skipped, not fatal
                skipped.append({"slide_id": str(row["slide_id"]), "path": str(row["path"]),
                                "label": int(row["label"]), "error": type(error).__name__, "reason": str(error)})
                continue
            patches.append(chosen)
            labels += [int(row["label"])] * len(chosen)
    if not patches:
        raise ValueError(f"no training patches: every training slide failed ({skipped[:3]})")
    read_s = time.perf_counter() - started
    model, losses = train_patch_classifier(np.concatenate(patches), np.asarray(labels), NUM_CLASSES[task], config,
                                           progress=progress)
    info = {"n_train_slides": len(patches), "n_train_patches": len(labels), "epoch_losses": losses,
            "patch_read_s": read_s, "train_s": time.perf_counter() - started - read_s, "skipped": skipped}
    return model, info


def evaluate_sliding_window(model: ResNet18, rows: Sequence[dict[str, Any]], task: str,
                            config: SlidingWindowConfig, pool: Any, progress: bool = True,
                            method: str = "sliding-window") -> EvaluationReport:
    """Score every slide by the sliding window; bad slides are skipped and reported."""
    report = EvaluationReport(method=method, task=task)
    names = CLASS_NAMES[task]
    started = time.perf_counter()
    torch.set_grad_enabled(False)
    try:
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="low-power") as executor:
            futures = _prefetch(rows, config, executor)
            for row, future in tqdm(zip(rows, futures, strict=True), total=len(rows),
                                    desc=f"evaluate ({method})", unit="slide", disable=not progress):
                slide_id, path = str(row["slide_id"]), str(row["path"])
                try:
                    view = future.result()
                    before = pool.pixels_read_level0(path)
                    score = score_slide_sliding_window(model, view.rgb, view.level0_dims, view.objective_power,
                                                       pool_patch_reader(pool, path, config), config, view.tissue)
                except Exception as error:  # noqa: BLE001 - one bad slide must not stop the cohort
                    report.skipped.append({"slide_id": slide_id, "path": path, "label": int(row["label"]),
                                           "error": type(error).__name__, "reason": str(error)})
                    continue
                pixels = pool.pixels_read_level0(path) - before
                area = view.level0_dims[0] * view.level0_dims[1]
                prediction = {
                    "slide_id": slide_id, "path": path, "label": int(row["label"]), "fold": int(row["fold"]),
                    "method": method, "predicted_class": score.predicted_class,
                    "predicted_label": names[score.predicted_class], "confidence": score.confidence,
                    "correct": bool(score.predicted_class == int(row["label"])), "n_tiles": score.n_patches,
                    "level0_pixels_read": int(pixels), "fraction_level0_read": pixels / area,
                    "width_level0_px": view.level0_dims[0], "height_level0_px": view.level0_dims[1],
                    "wall_time_s": view.load_s + score.timings_s["total_s"], "thumbnail_s": view.load_s,
                    "score_s": score.timings_s["total_s"], "selection": score.selection,
                }
                prediction |= {f"prob_{n}": float(p) for n, p in zip(names, score.class_probabilities, strict=True)}
                report.predictions.append(prediction)
                for rank, box in enumerate(score.top_patches):
                    report.tiles.append({"slide_id": slide_id, "tile_index": rank, "x0": box.x0, "y0": box.y0,
                                         "width": box.width, "height": box.height})
    finally:
        torch.set_grad_enabled(True)
    report.elapsed_s = time.perf_counter() - started
    report.metrics = metrics_from_predictions(report.predictions, task)
    return report


def save_sliding_window_model(path: str | Path, model: ResNet18, config: SlidingWindowConfig, task: str,
                              info: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": config.to_dict(), "task": task, "state_dict": model.state_dict(),
                "info": {k: v for k, v in (info or {}).items() if k != "skipped"}}, path)
    return path


def load_sliding_window_model(path: str | Path) -> tuple[ResNet18, SlidingWindowConfig, str]:
    """Raises ``CheckpointError`` naming the file when it is missing, corrupt or holds anything but
    tensors and plain values (``weights_only``: loading never runs code from the file)."""
    from dual_attention.checkpoint import CheckpointError

    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt, foreign or poisoned files
        raise CheckpointError(f"{path}: not a readable sliding-window model ({type(error).__name__}: {error})"
                              ) from error
    config = SlidingWindowConfig(**payload["config"])
    model = ResNet18(NUM_CLASSES[payload["task"]], config.resnet_width)
    model.load_state_dict(payload["state_dict"])
    return model.eval(), config, payload["task"]


def run_sliding_window(manifest_path: str | Path, out_dir: str | Path, train_folds: Sequence[int] | None,
                       test_folds: Sequence[int] | None, config: SlidingWindowConfig, *, model_path: str | Path | None = None,
                       num_readers: int = 2, pool: Any = None, progress: bool = True) -> EvaluationReport:
    """Train on ``train_folds`` (unless ``model_path`` gives a trained ResNet18), evaluate on ``test_folds``."""
    from jobs.runtime.tile_plane import TilePool

    rows_all = select_rows(manifest_path)
    task = str(rows_all[0]["task"])
    rows_all = select_rows(manifest_path, task=task)  # refuses a mixed-task manifest by name
    test_rows = select_rows(manifest_path, test_folds, task=task)
    out_dir = Path(out_dir)
    with RaySession(log_to_driver=False):
        own_pool = pool is None
        pool = pool or TilePool(num_actors=num_readers)
        try:
            if model_path is not None:
                model, config, model_task = load_sliding_window_model(model_path)
                if model_task != task:
                    raise ValueError(f"{model_path}: a {model_task} model cannot score a {task} manifest")
                info: dict[str, Any] = {}
            else:
                train_rows = select_rows(manifest_path, train_folds, task=task)
                overlap = {r["slide_id"] for r in train_rows} & {r["slide_id"] for r in test_rows}
                if overlap:
                    raise ValueError(f"train and test folds share slides: {sorted(overlap)[:5]}")
                model, info = train_sliding_window(train_rows, task, config, pool, progress=progress)
                save_sliding_window_model(out_dir / SLIDING_WINDOW_MODEL_FILE, model, config, task, info)
            report = evaluate_sliding_window(model, test_rows, task, config, pool, progress=progress)
        finally:
            if own_pool:
                pool.shutdown()
    report.skipped = list(info.get("skipped", [])) + report.skipped if info else report.skipped
    report.write(out_dir)
    return report


# -- command line ------------------------------------------------------------------------------------------------


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog or "python -m jobs.baselines", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="baseline", required=True)

    random_parser = sub.add_parser("random", help="the trained agent on randomly sampled tissue tiles")
    add_model_flags(random_parser)
    random_parser.add_argument("--manifest", required=True)
    random_parser.add_argument("--out", required=True)
    random_parser.add_argument("--folds", type=fold_list, default=None)
    random_parser.add_argument("--seed", type=int, default=0)
    random_parser.add_argument("--num-readers", type=int, default=2)
    random_parser.add_argument("--overlays", type=int, default=4)
    random_parser.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads")
    random_parser.add_argument("--quiet", action="store_true")

    window = sub.add_parser("sliding-window", help="ResNet18 over every stained-tissue patch, top-15 aggregation")
    window.add_argument("--manifest", required=True)
    window.add_argument("--out", required=True)
    window.add_argument("--train-folds", type=fold_list, default=None, help="folds to train on")
    window.add_argument("--test-folds", type=fold_list, default=None, help="folds to evaluate on")
    window.add_argument("--model-path", default=None, help=f"a trained {SLIDING_WINDOW_MODEL_FILE} (skips training)")
    window.add_argument("--preset", choices=("cpu-small", "paper"), default="cpu-small")
    for name, kind in (("patch-px", int), ("magnification", float), ("top-k", int), ("epochs", int),
                       ("resnet-width", int), ("train-patches-per-slide", int), ("min-tissue-fraction", float),
                       ("dab-threshold", float), ("seed", int)):
        window.add_argument(f"--{name}", type=kind, default=None)
    window.add_argument("--stain-mask", choices=("dab", "gray", "none"), default=None)
    window.add_argument("--num-readers", type=int, default=2)
    window.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads (1 is much faster on small machines shared with other jobs)")
    window.add_argument("--quiet", action="store_true")
    return parser


def sliding_window_config_from_args(args: argparse.Namespace, task: str) -> SlidingWindowConfig:
    base = paper_config(task) if args.preset == "paper" else cpu_small_config(task)
    changes = {field.name: getattr(args, field.name) for field in dataclasses.fields(SlidingWindowConfig)
               if getattr(args, field.name, None) is not None}
    return dataclasses.replace(base, **changes)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        set_torch_threads(args.torch_threads)
        if args.baseline == "random":
            report = run_random_baseline(args.model, args.manifest, args.out, folds=args.folds, seed=args.seed,
                                         num_readers=args.num_readers, n_overlays=args.overlays,
                                         tracking_uri=args.mlflow_uri, progress=not args.quiet)
        else:
            if args.train_folds is None and args.model_path is None:
                raise ValueError("sliding-window needs --train-folds (or --model-path of a trained model)")
            task = str(select_rows(args.manifest)[0]["task"])
            config = sliding_window_config_from_args(args, task)
            report = run_sliding_window(args.manifest, args.out, args.train_folds, args.test_folds, config,
                                        model_path=args.model_path, num_readers=args.num_readers,
                                        progress=not args.quiet)
    except (ManifestError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_report(report)
    return 0 if report.predictions else 1


if __name__ == "__main__":
    sys.exit(main())
