"""Proof that the dual attention learns, in the shape of the paper's Tables I-II: dual attention vs random
sampling (same agent) vs sliding window on synthetic HER2 and MMR cohorts, several fresh cohort seeds.

    .venv/bin/python benchmarks/bench_cohort_tables.py                          # the committed tables
    .venv/bin/python benchmarks/bench_cohort_tables.py --seeds 7 --tasks her2 --set train.epochs=2   # smoke

Per (task, cohort seed): ``--n-slides`` slides of ``--slide-px``² in 4 folds; the test fold rotates with the
seed (k-fold over seeds: seed i tests on fold i mod 4), the other three folds train. Nothing is chosen on
the test folds: the preset (``cpu-small``) was set on cohort seeds 101/202, fold 0, which are not used here.

- dual attention: ``dual_attention.training.fit`` in this process, the preset as it ships (the same steps
  the Ray Train job takes; tiles read with OpenSlide here), last epoch's weights;
- random sampling: the same model, tiles drawn uniformly over tissue (``sampler="random"``);
- sliding window: ``dual_attention.sliding_window`` (ResNet18 from scratch on patches of the training
  slides, top-k aggregation), the baseline job's CPU settings.

Reported per method: accuracy, macro F1, AUROC, HER2 contest points per case, % of level 0 read, attention
mass on tumour ÷ tumour's share of tissue, tumour fraction of the tiles scored, spread of the glimpse
trails across tiles; mean ± sd over seeds. Figures: attention maps of two test slides over training (the
paper's Fig. 3) and glimpse trails on tiles (Fig. 4), in benchmarks/figures/. Raw numbers:
benchmarks/results/cohort_tables.json (written by this script).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

RESULTS = PROJECT_ROOT / "benchmarks" / "results"
FIGURES = PROJECT_ROOT / "benchmarks" / "figures"
METHODS = ("dual attention", "random sampling", "sliding window")


def load_examples(rows: list[dict[str, Any]], config: Any) -> dict[str, Any]:
    from dual_attention.slides import SlideHandleCache, read_tumour_mask, tissue_mask
    from dual_attention.training import SlideExample

    cache = SlideHandleCache(max_open=64)

    def reader(path: str):  # noqa: ANN202
        def read(boxes):  # noqa: ANN001, ANN202
            slide = cache.get(path)
            return np.stack([slide.read_box(box) for box in boxes])
        return read

    examples = {}
    for row in rows:
        slide = cache.get(row["path"])
        thumbnail = slide.thumbnail(config.slide.thumbnail_downsample)
        tissue = tissue_mask(thumbnail, config.slide.tissue_min_area_thumb_px)
        examples[row["slide_id"]] = SlideExample(
            row["slide_id"], int(row["label"]), thumbnail, tissue, tuple(slide.dimensions), reader(row["path"]),
            read_tumour_mask(row["tumour_mask_path"], tissue.shape))
    return examples


def score_methods(model: Any, config: Any, test: list[Any], seed: int) -> dict[str, dict[str, Any]]:
    import torch

    from dual_attention.pipeline import score_slide, slide_seed
    from dual_attention.training import ValidatedSlide, epoch_diagnostics, prediction_row, validation_metrics

    out = {}
    for sampler, method in (("attention", "dual attention"), ("random", "random sampling")):
        rows, fractions, started = [], [], time.perf_counter()
        for example in test:
            with torch.no_grad():
                score = score_slide(model, example.thumbnail, example.tissue_mask, example.level0_dims,
                                    example.read_tiles, config, seed=slide_seed(seed, example.slide_id),
                                    sampler=sampler)
            rows.append(prediction_row(ValidatedSlide(example, seed, score), config))
            fractions.append(score.fraction_level0_read)
        metrics = validation_metrics(config.task, rows)
        metrics |= epoch_diagnostics(rows)
        metrics |= {"fraction_level0_read": float(np.mean(fractions)),
                    "seconds_per_slide": (time.perf_counter() - started) / len(test)}
        out[method] = metrics
    return out


def sliding_window(task: str, train_rows: list[dict[str, Any]], test_rows: list[dict[str, Any]], seed: int
                   ) -> dict[str, Any]:
    from dual_attention.metrics import slide_metrics, tumour_fraction_of_boxes
    from dual_attention.slides import open_slide, read_tumour_mask, tissue_mask
    from dual_attention.sliding_window import (
        cpu_small_config,
        patch_grid,
        sample_training_patches,
        score_slide_sliding_window,
        slide_patch_reader,
        train_patch_classifier,
    )

    config = cpu_small_config(task, seed=seed)
    num_classes = 4 if task == "her2" else 2

    def view(row: dict[str, Any]) -> tuple[Any, np.ndarray, np.ndarray, tuple[int, int], float]:
        slide = open_slide(row["path"])
        rgb = slide.thumbnail(config.mask_downsample)
        return slide, rgb, tissue_mask(rgb, 4), tuple(slide.dimensions), float(slide.info.objective_power)

    patches, labels = [], []
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    for row in train_rows:
        slide, rgb, tissue, dims, objective = view(row)
        grid = patch_grid(rgb, dims, objective, config, tissue)
        if grid.level0_boxes:
            chosen = sample_training_patches(grid, slide_patch_reader(slide, config), config.train_patches_per_slide,
                                             rng)
            patches.append(chosen)
            labels += [int(row["label"])] * len(chosen)
        slide.close()
    model, _ = train_patch_classifier(np.concatenate(patches), np.asarray(labels), num_classes, config,
                                      progress=False)
    train_s = time.perf_counter() - started
    predicted, probabilities, confidence, fractions, tumour, started = [], [], [], [], [], time.perf_counter()
    for row in test_rows:
        slide, rgb, tissue, dims, objective = view(row)
        score = score_slide_sliding_window(model, rgb, dims, objective, slide_patch_reader(slide, config), config,
                                           tissue)
        slide.close()
        predicted.append(score.predicted_class)
        probabilities.append(score.class_probabilities)
        confidence.append(score.confidence)
        fractions.append(score.fraction_level0_read)
        mask = read_tumour_mask(row["tumour_mask_path"], (-(-dims[1] // 32), -(-dims[0] // 32)))
        tumour += tumour_fraction_of_boxes(score.top_patches, mask, 32)
    metrics = slide_metrics(task, [int(r["label"]) for r in test_rows], predicted, probabilities, confidence)
    return metrics | {"fraction_level0_read": float(np.mean(fractions)), "tiles_tumour_fraction": float(np.mean(tumour)),
                      "seconds_per_slide": (time.perf_counter() - started) / len(test_rows), "train_s": train_s}


def run_one(task: str, seed: int, index: int, args: argparse.Namespace) -> dict[str, Any]:
    """One cohort: write it, train dual attention, score the three methods on its test fold."""
    import torch

    from dual_attention.config import preset
    from dual_attention.manifest import read_manifest
    from dual_attention.models import DualAttentionModel
    from dual_attention.synthetic import write_cohort
    from dual_attention.training import fit

    torch.set_num_threads(1)
    work = Path(args.work_dir) / f"{task}-{seed}"
    if not (work / "manifest.parquet").is_file():
        write_cohort(work, task, args.n_slides, seed=seed, slide_level0_px=args.slide_px, n_folds=4, progress=False)
    rows = read_manifest(work / "manifest.parquet").to_pylist()
    test_fold = index % 4
    train_rows = [r for r in rows if int(r["fold"]) != test_fold]
    test_rows = [r for r in rows if int(r["fold"]) == test_fold]
    config = preset("cpu-small", task=task).with_overrides(args.set + [f"train.seed={seed}"])
    examples = load_examples(rows, config)
    test = [examples[r["slide_id"]] for r in test_rows]
    figure_slides = test[:2]
    maps: list[tuple[int, list[np.ndarray]]] = []

    def snapshot(epoch: int) -> None:
        from dual_attention.pipeline import attention_map_of

        with torch.no_grad():
            maps.append((epoch, [attention_map_of(model, e.thumbnail, e.tissue_mask).numpy() for e in figure_slides]))

    torch.manual_seed(seed)
    model = DualAttentionModel(config)
    snapshot(0)
    log: list[str] = []
    started = time.perf_counter()

    def on_epoch(record: Any) -> None:
        t = record.train
        line = (f"[{task} {seed}] epoch {record.epoch + 1}/{config.train.epochs} {record.seconds:.0f}s "
                f"tile_acc={t.get('tile_accuracy', float('nan')):.2f} "
                f"attn_on_tumour={t.get('attention_tumour_ratio', float('nan')):.2f} "
                f"tiles_tumour={t.get('tiles_tumour_fraction', float('nan')):.2f}")
        log.append(line)
        print(line, flush=True)
        if (record.epoch + 1) in {config.train.epochs // 4, config.train.epochs // 2, config.train.epochs}:
            snapshot(record.epoch + 1)

    fit(model, config, [examples[r["slide_id"]] for r in train_rows], (), on_epoch=on_epoch)
    train_s = time.perf_counter() - started
    model.eval()
    methods = score_methods(model, config, test, seed)
    methods["sliding window"] = sliding_window(task, train_rows, test_rows, seed)
    if index == 0:
        figures(task, seed, model, config, figure_slides, maps)
    print(f"[{task} {seed}] " + ", ".join(f"{m}: acc {v['accuracy']:.3f}" for m, v in methods.items()), flush=True)
    return {"task": task, "seed": seed, "test_fold": test_fold, "n_train": len(train_rows), "n_test": len(test_rows),
            "train_s": train_s, "methods": methods, "log": log}


def figures(task: str, seed: int, model: Any, config: Any, slides: list[Any], maps: list[tuple[int, list[np.ndarray]]]
            ) -> None:
    """Fig. 3: attention over training on two test slides; Fig. 4: glimpse trails on the sampled tiles."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from dual_attention.pipeline import score_slide, slide_seed

    FIGURES.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(2.4 * (len(maps) + 2), 2.6 * len(slides)), dpi=110)
    axes = figure.subplots(len(slides), len(maps) + 2, squeeze=False)
    for i, example in enumerate(slides):
        axes[i][0].imshow(example.thumbnail)
        axes[i][0].set_title(f"{example.slide_id} ({config.class_names[example.label]})", fontsize=8)
        axes[i][1].imshow(np.where(example.tissue_mask, example.tumour_mask, np.nan), cmap="Reds", vmin=0, vmax=1)
        axes[i][1].set_title("tumour (ground truth)", fontsize=8)
        n_tissue = max(int(example.tissue_mask.sum()), 1)
        for j, (epoch, epoch_maps) in enumerate(maps):
            # log10 of attention ÷ uniform: 0 = the flat map's value, +1 = ten times it; a linear scale would
            # show only the few brightest pixels of a concentrated map
            relative = np.log10(np.maximum(epoch_maps[i] * n_tissue, 1e-3))
            image = axes[i][j + 2].imshow(np.where(example.tissue_mask, relative, np.nan), cmap="magma",
                                          vmin=-1.5, vmax=1.5)
            axes[i][j + 2].set_title(f"attention, epoch {epoch}", fontsize=8)
        figure.colorbar(image, ax=axes[i][-1], fraction=0.046, label="log10(attention ÷ uniform)")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    figure.tight_layout()
    figure.savefig(FIGURES / f"attention_over_training_{task}.png")

    example = slides[0]
    score = score_slide(model, example.thumbnail, example.tissue_mask, example.level0_dims, example.read_tiles,
                        config, seed=slide_seed(seed, example.slide_id))
    tiles = example.read_tiles([t.level0_box for t in score.tiles])
    figure = Figure(figsize=(2.6 * len(tiles), 2.9), dpi=110)
    axes = figure.subplots(1, len(tiles), squeeze=False)[0]
    glimpse = config.agent.glimpse_px
    for ax, tile, tile_score in zip(axes, tiles, score.tiles, strict=True):
        ax.imshow(tile)
        box = tile_score.level0_box
        trail = [(x - box.x0, y - box.y0) for x, y in tile_score.glimpse_trail_level0]
        ax.plot([p[0] for p in trail], [p[1] for p in trail], "-", color="cyan", lw=1)
        for step, (x, y) in enumerate(trail):
            ax.add_patch(Rectangle((x - glimpse / 2, y - glimpse / 2), glimpse, glimpse, fill=False, color="cyan", lw=1))
            ax.text(x, y, str(step + 1), color="yellow", fontsize=9, ha="center", va="center")
        ax.set_title(f"{config.class_names[tile_score.predicted_class]} "
                     f"p={max(tile_score.class_probabilities):.2f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    figure.suptitle(f"{example.slide_id} (label {config.class_names[example.label]}): glimpse trails", fontsize=9)
    figure.tight_layout()
    figure.savefig(FIGURES / f"glimpse_trails_{task}.png")


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("accuracy", "f1_macro", "auroc", "agreement_points_per_case", "fraction_level0_read", "attention_tumour_ratio",
            "tiles_tumour_fraction", "glimpse_spread", "seconds_per_slide")
    out: dict[str, Any] = {}
    for task in sorted({r["task"] for r in runs}):
        task_runs = [r for r in runs if r["task"] == task]
        out[task] = {}
        for method in METHODS:
            out[task][method] = {}
            for key in keys:
                values = [r["methods"][method].get(key, float("nan")) for r in task_runs]
                values = [v for v in values if isinstance(v, float) and np.isfinite(v)]
                if values:
                    out[task][method][key] = {"mean": float(np.mean(values)), "sd": float(np.std(values)),
                                              "n": len(values)}
    return out


def table(summary: dict[str, Any], runs: list[dict[str, Any]], args: argparse.Namespace, total_s: float) -> str:
    def cell(stats: dict[str, Any], key: str, scale: float = 1.0, spec: str = ".3f") -> str:
        if key not in stats:
            return "n/a"
        return f"{format(scale * stats[key]['mean'], spec)} ± {format(scale * stats[key]['sd'], spec)}"

    lines = [f"Command: `.venv/bin/python benchmarks/bench_cohort_tables.py {' '.join(args.argv)}`".rstrip(),
             f"({total_s / 60:.1f} min; seeds {args.seeds}; {args.n_slides} slides of {args.slide_px}² per cohort, "
             "3 folds train, 1 test; mean ± sd over seeds)", ""]
    for task, methods in summary.items():
        n_test = sum(r["n_test"] for r in runs if r["task"] == task)
        lines += [f"**{task.upper()}** ({n_test} test slides over {len([r for r in runs if r['task'] == task])} "
                  "cohorts)", "",
                  "| method | accuracy | macro F1 | AUROC | contest pts / case (of 15) | % level 0 read | "
                  "attention on tumour ÷ share | tumour in tiles | glimpse spread | s / slide |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for method, stats in methods.items():
            lines.append(f"| {method} | {cell(stats, 'accuracy')} | {cell(stats, 'f1_macro')} | {cell(stats, 'auroc')} | "
                         f"{cell(stats, 'agreement_points_per_case', 1, '.1f')} | "
                         f"{cell(stats, 'fraction_level0_read', 100, '.2f')} | "
                         f"{cell(stats, 'attention_tumour_ratio', 1, '.2f') if method == 'dual attention' else '—'} | "
                         f"{cell(stats, 'tiles_tumour_fraction', 1, '.2f')} | "
                         f"{cell(stats, 'glimpse_spread', 1, '.3f') if method != 'sliding window' else '—'} | "
                         f"{cell(stats, 'seconds_per_slide', 1, '.2f')} |")
        lines.append("")
    lines += ["| target | measured | met |", "|---|---|---|"]
    for task, methods in summary.items():
        da, rs, sw = (methods[m] for m in METHODS)
        key = "accuracy" if task == "her2" else "f1_macro"
        gap = 100 * (da[key]["mean"] - rs[key]["mean"])
        lines.append(f"| {task}: dual attention − random sampling, {key} | {gap:+.1f} points | "
                     f"{'yes' if gap >= 15 else 'no'} (≥ +15) |")
        ratio = da["accuracy"]["mean"] / sw["accuracy"]["mean"]
        lines.append(f"| {task}: dual attention ÷ sliding window, accuracy | {ratio:.2f} | "
                     f"{'yes' if ratio >= 1.0 else 'no'} (≥ 1.0) |")
        if "attention_tumour_ratio" in da:
            value = da["attention_tumour_ratio"]["mean"]
            lines.append(f"| {task}: attention on tumour ÷ tumour share, test slides | {value:.2f} | "
                         f"{'yes' if value >= 2.0 else 'no'} (≥ 2.0) |")
        value = da["tiles_tumour_fraction"]["mean"]
        lines.append(f"| {task}: tumour fraction of the sampled tiles | {value:.2f} (random {rs['tiles_tumour_fraction']['mean']:.2f}) | "
                     f"{'yes' if value >= 0.8 else 'no'} (≥ 0.8) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="her2,mmr")
    parser.add_argument("--seeds", default="303,404,505", help="fresh cohort seeds (never used to choose settings)")
    parser.add_argument("--n-slides", type=int, default=48)
    parser.add_argument("--slide-px", type=int, default=3072)
    parser.add_argument("--set", action="append", default=[], help="config override SECTION.FIELD=VALUE")
    parser.add_argument("--jobs", type=int, default=2, help="cohorts trained at once (one core each)")
    parser.add_argument("--work-dir", default="/tmp/cohort-tables")
    parser.add_argument("--out", default=str(RESULTS / "cohort_tables.json"))
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(task, seed, i) for task in args.tasks.split(",") for i, seed in enumerate(seeds)]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        runs = list(pool.map(run_one, *zip(*jobs, strict=True), [args] * len(jobs)))
    total_s = time.perf_counter() - started
    summary = summarise(runs)
    text = table(summary, runs, args, total_s)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, "total_s": total_s,
                                          "summary": summary, "runs": runs, "table_md": text}, indent=1, default=float))


if __name__ == "__main__":
    main()
