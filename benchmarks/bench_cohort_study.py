"""Cohort study in the shape of the paper's Tables I-II, on synthetic HER2 and MMR cohorts: dual attention
vs random sampling vs sliding window, and the per-slide cost of each on a gigapixel slide.

    .venv/bin/python benchmarks/bench_cohort_study.py                     # the committed table
    .venv/bin/python benchmarks/bench_cohort_study.py --n-slides 16 --epochs 2 --skip-giga   # smoke run

Per task (cpu-small preset, ``--n-slides`` slides of ``--slide-px``² at 40x, 4 stratified folds):

1. the cohort is written by ``dual_attention.synthetic.write_cohort`` into ``--work-dir`` (reused if there);
2. dual attention is trained **in-process** with ``pipeline.training_step`` on the folds not in
   ``--test-folds``
   (the training job's optimiser and class-balanced batches, ``jobs.train.build_optimizer`` and
   ``class_balanced_batches``; tiles read with OpenSlide in this process). Ray Train's two DDP workers,
   per-epoch validation and MLflow logging cost minutes on 2 shared cores, and the study has to fit in
   about 20 minutes; the loss and the model are the same ones ``jobs.train`` uses;
3. the test fold is scored by ``jobs.evaluate`` (tiles through the Ray tile plane), by the random
   baseline (same agent, Gumbel tiles over tissue) and by the sliding window (``jobs.baselines``: a
   ResNet18 trained from scratch on patches of the training folds; 64² patches at 20x, i.e. 128 level-0
   px each, ``sliding_window.cpu_small_config``).

Gigapixel slide (``--giga-px``², default 32768² = 1.07 Gpx, HER2 3+): the trained HER2 dual attention
model and the trained sliding-window ResNet18 score the same slide through the same tile pool; wall time
includes opening the slide and its thumbnail / low-power view and mask for both.

Prints markdown tables (paste under ``## Cohort study`` in benchmarks/RESULTS.md) and writes them, with
the raw numbers, to ``--work-dir/cohort_study.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

import torch  # noqa: E402

from dual_attention.checkpoint import save_checkpoint  # noqa: E402
from dual_attention.config import DualAttentionConfig, preset  # noqa: E402
from dual_attention.models import DualAttentionModel  # noqa: E402
from dual_attention.pipeline import ScoringError  # noqa: E402
from dual_attention.slides import SlideHandleCache, tissue_mask  # noqa: E402
from dual_attention.sliding_window import cpu_small_config, score_slide_sliding_window  # noqa: E402
from dual_attention.training import SlideBatch, build_optimizer, class_balanced_batches, training_step  # noqa: E402
from jobs.baselines import (  # noqa: E402
    SLIDING_WINDOW_MODEL_FILE,
    evaluate_sliding_window,
    load_low_power_view,
    load_sliding_window_model,
    pool_patch_reader,
    save_sliding_window_model,
    train_sliding_window,
)
from jobs.evaluate import evaluate_rows, load_slide_input, select_rows  # noqa: E402
from jobs.runtime.cluster import RaySession  # noqa: E402

METHODS = ("dual-attention", "random-sampling", "sliding-window")


# -- dual attention training, in-process ---------------------------------------------------------------------


def train_dual_attention(config: DualAttentionConfig, rows: list[dict[str, Any]], log: list[str]) -> DualAttentionModel:
    """``config.train.epochs`` epochs of ``training_step`` over the training rows (one pass per epoch)."""
    torch.manual_seed(config.train.seed)
    model = DualAttentionModel(config)
    optimizer, scheduler = build_optimizer(model, config)
    slides = SlideHandleCache(max_open=64)
    inputs = {}
    for row in rows:
        slide = slides.get(row["path"])
        thumbnail = slide.thumbnail(config.slide.thumbnail_downsample)
        inputs[row["slide_id"]] = (thumbnail, tissue_mask(thumbnail, config.slide.tissue_min_area_thumb_px),
                                   tuple(slide.dimensions))

    def reader(path: str):  # noqa: ANN202
        def read(boxes):  # noqa: ANN001, ANN202
            slide = slides.get(path)
            return np.stack([slide.read_box(box) for box in boxes])
        return read

    labels = [int(r["label"]) for r in rows]
    steps = max(1, int(np.ceil(len(rows) / config.train.slides_per_batch)))
    for epoch in range(config.train.epochs):
        started = time.perf_counter()
        plan = class_balanced_batches(labels, config.num_classes, config.train.slides_per_batch, steps,
                                      np.random.default_rng([config.train.seed, epoch]))
        model.train()
        terms_seen = []
        for step, indices in enumerate(plan):
            members = [rows[i] for i in indices]
            batch = SlideBatch(
                thumbnails=[inputs[m["slide_id"]][0] for m in members],
                tissue_masks=[inputs[m["slide_id"]][1] for m in members],
                labels=[int(m["label"]) for m in members],
                level0_dims=[inputs[m["slide_id"]][2] for m in members],
                read_tiles=[reader(m["path"]) for m in members],
                slide_ids=[m["slide_id"] for m in members],
            )
            try:
                loss, terms = training_step(model, batch, epoch, config,
                                            np.random.default_rng([config.train.seed, epoch, step]))
            except ScoringError as error:
                log.append(f"epoch {epoch} step {step}: skipped ({error})")
                continue
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            terms_seen.append(terms)
        scheduler.step()
        mean = {k: float(np.nanmean([t[k] for t in terms_seen])) for k in ("l_j", "tile_accuracy", "sam_accuracy")}
        line = (f"epoch {epoch}: L_J {mean['l_j']:.3f}, tile acc {mean['tile_accuracy']:.2f}, "
                f"SAM acc {mean['sam_accuracy']:.2f}, {time.perf_counter() - started:.0f}s")
        log.append(line)
        print(f"  [train] {line}", flush=True)
    return model.eval()


# -- one task ------------------------------------------------------------------------------------------------


def run_task(task: str, args: argparse.Namespace, pool: Any) -> dict[str, Any]:
    from dual_attention.synthetic import write_cohort

    work = Path(args.work_dir) / task
    manifest = work / "manifest.parquet"
    timings: dict[str, float] = {}
    started = time.perf_counter()
    if not manifest.is_file():
        write_cohort(work, task, args.n_slides, seed=args.seed, slide_level0_px=args.slide_px, n_folds=4,
                     progress=False)
    timings["cohort_s"] = time.perf_counter() - started
    rows = select_rows(manifest, task=task)
    test_folds = {int(f) for f in args.test_folds.split(",")}
    train_rows = [r for r in rows if int(r["fold"]) not in test_folds]
    test_rows = [r for r in rows if int(r["fold"]) in test_folds]
    print(f"[{task}] {len(train_rows)} training slides, {len(test_rows)} test slides", flush=True)

    config = preset("cpu-small", task=task).with_overrides(
        {"train.epochs": args.epochs, "train.seed": args.seed} | dict(
            item.split("=", 1) for item in args.set))
    log: list[str] = []
    started = time.perf_counter()
    model = train_dual_attention(config, train_rows, log)
    timings["train_dual_attention_s"] = time.perf_counter() - started
    save_checkpoint(work / "dual_attention_checkpoint", model, config, extra={"trained_by": "bench_cohort_study"})

    reports = {}
    for sampler, method in (("attention", "dual-attention"), ("random", "random-sampling")):
        started = time.perf_counter()
        report = evaluate_rows(model, config, test_rows,
                               sampler=sampler, seed=args.seed, method=method, progress=False)
        report.write(work / method)
        reports[method] = report
        timings[f"eval_{method}_s"] = time.perf_counter() - started

    window_config = cpu_small_config(task, seed=args.seed)
    started = time.perf_counter()
    window_model, window_info = train_sliding_window(train_rows, task, window_config, pool, progress=False)
    timings["train_sliding_window_s"] = time.perf_counter() - started
    save_sliding_window_model(work / SLIDING_WINDOW_MODEL_FILE, window_model, window_config, task, window_info)
    started = time.perf_counter()
    report = evaluate_sliding_window(window_model, test_rows, task, window_config, pool, progress=False)
    report.write(work / "sliding-window")
    reports["sliding-window"] = report
    timings["eval_sliding-window_s"] = time.perf_counter() - started
    for method, rep in reports.items():
        rep.metrics |= {f"tiles_{k}": v for k, v in tumour_coverage(work, method).items()}
        summary = rep.summary()
        print(f"[{task}] {method}: accuracy {summary.get('accuracy', float('nan')):.3f}, skipped {len(rep.skipped)}",
              flush=True)
    return {"task": task, "config": config, "model": model, "window_model": window_model,
            "window_config": window_config, "window_info": {k: v for k, v in window_info.items() if k != "skipped"},
            "summaries": {m: r.summary() for m, r in reports.items()}, "timings": timings, "train_log": log,
            "n_train": len(train_rows), "n_test": len(test_rows)}


def tumour_coverage(work: Path, method: str) -> dict[str, float]:
    """How much tumour the tiles / patches of ``method`` cover, from the cohort's tumour masks (1/32 of
    level 0): the mean over tiles of the tumour fraction inside the tile, and the share of tiles with any
    tumour. Explains when attention can (or cannot) beat random tissue tiles."""
    import pyarrow.parquet as pq
    from PIL import Image

    from dual_attention.manifest import read_manifest

    masks = {r["slide_id"]: r["tumour_mask_path"] for r in read_manifest(work / "manifest.parquet").to_pylist()}
    tiles = pq.read_table(work / method / "tiles.parquet").to_pylist()
    cache: dict[str, np.ndarray] = {}
    fractions = []
    for tile in tiles:
        sid = tile["slide_id"]
        if sid not in cache:
            cache[sid] = np.asarray(Image.open(masks[sid])) > 0
        mask = cache[sid]
        r0, c0 = tile["y0"] // 32, tile["x0"] // 32
        r1, c1 = -(-(tile["y0"] + tile["height"]) // 32), -(-(tile["x0"] + tile["width"]) // 32)
        fractions.append(float(mask[r0:r1, c0:c1].mean()))
    values = np.asarray(fractions)
    return {"mean_tumour_fraction": float(values.mean()), "tiles_with_tumour": float((values > 0).mean()),
            "slide_tumour_fraction": float(np.mean([m.mean() for m in cache.values()]))}


# -- the gigapixel slide -------------------------------------------------------------------------------------


def _time_dual_attention(model: Any, config: DualAttentionConfig, path: Path, pool: Any, seed: int) -> dict[str, Any]:
    from dual_attention.pipeline import score_slide

    pool.reset_pixel_counts(str(path))
    started = time.perf_counter()
    inputs = load_slide_input(str(path), config.slide.thumbnail_downsample, config.slide.tissue_min_area_thumb_px)
    with torch.no_grad():
        score = score_slide(model, inputs.thumbnail, inputs.tissue_mask, inputs.level0_dims,
                            pool.read_tiles_fn(str(path), config.tile.tile_level0_px), config, seed)
    wall = time.perf_counter() - started
    pixels = pool.pixels_read_level0(str(path))
    area = inputs.level0_dims[0] * inputs.level0_dims[1]
    return {"wall_s": wall, "thumbnail_s": inputs.thumbnail_s, "pixels": pixels, "fraction": pixels / area,
            "units": len(score.tiles), "predicted": score.predicted_label, "level0_dims": inputs.level0_dims}


def _time_sliding_window(model: Any, window_config: Any, path: Path, pool: Any, class_names: tuple[str, ...]
                         ) -> dict[str, Any]:
    pool.reset_pixel_counts(str(path))
    started = time.perf_counter()
    view = load_low_power_view(str(path), window_config)
    with torch.no_grad():
        score = score_slide_sliding_window(model, view.rgb, view.level0_dims, view.objective_power,
                                           pool_patch_reader(pool, str(path), window_config), window_config,
                                           view.tissue)
    wall = time.perf_counter() - started
    pixels = pool.pixels_read_level0(str(path))
    area = view.level0_dims[0] * view.level0_dims[1]
    return {"wall_s": wall, "thumbnail_s": view.load_s, "pixels": pixels, "fraction": pixels / area,
            "units": score.n_patches, "predicted": class_names[score.predicted_class], "timings": score.timings_s}


def gigapixel_timing(her2: dict[str, Any], args: argparse.Namespace, pool: Any) -> dict[str, Any]:
    """Each method on the same gigapixel slide through the same pool: the trained cpu-small models twice
    (first call = cold: new input shapes for torch, slide pages not yet cached; second = warm), and the
    paper's sizes once warm-ish (paper-her2 dual attention: 10 tiles of 2048²; sliding window: 224² at
    20x into a width-64 ResNet18) with untrained weights — the cost does not depend on the weights."""
    from dual_attention.sliding_window import ResNet18, paper_config
    from dual_attention.synthetic import write_synthetic_slide

    path = Path(args.giga_slide) if args.giga_slide else Path(args.work_dir) / f"giga-her2-{args.giga_px}.tiff"
    if not path.is_file():
        print(f"[giga] writing {path} ({args.giga_px}² level-0 px)", flush=True)
        started = time.perf_counter()
        write_synthetic_slide(path, "her2", 3, args.seed + 77, args.giga_px, args.giga_px)
        print(f"[giga] written in {time.perf_counter() - started:.0f}s", flush=True)
    config, model = her2["config"], her2["model"]
    names = config.class_names
    rows: dict[str, dict[str, Any]] = {}
    for run in ("cold", "warm"):
        rows[f"dual attention, cpu-small, trained ({run})"] = _time_dual_attention(model, config, path, pool,
                                                                                     args.seed)
        rows[f"sliding window, cpu-small, trained ({run})"] = _time_sliding_window(
            her2["window_model"], her2["window_config"], path, pool, names)
        for name in list(rows)[-2:]:
            print(f"[giga] {name}: {rows[name]['wall_s']:.2f}s, {rows[name]['units']} tiles/patches, "
                  f"{100 * rows[name]['fraction']:.4f}% read", flush=True)
    if not args.skip_giga_paper:
        paper = preset("paper-her2")
        torch.manual_seed(0)
        paper_model = DualAttentionModel(paper).eval()
        _time_dual_attention(paper_model, paper, path, pool, args.seed)  # warm-up: new shapes
        rows["dual attention, paper-her2 sizes, untrained (warm)"] = _time_dual_attention(
            paper_model, paper, path, pool, args.seed)
        window_paper = paper_config("her2")
        resnet = ResNet18(4, window_paper.resnet_width).eval()
        with torch.no_grad():  # warm-up on one batch of the paper's patch shape
            resnet(torch.rand(window_paper.batch_size, 3, window_paper.patch_px, window_paper.patch_px))
        rows["sliding window, paper sizes (224² at 20x, width 64), untrained"] = _time_sliding_window(
            resnet, window_paper, path, pool, names)
        for name in list(rows)[-2:]:
            print(f"[giga] {name}: {rows[name]['wall_s']:.2f}s, {rows[name]['units']} tiles/patches, "
                  f"{100 * rows[name]['fraction']:.4f}% read", flush=True)
    out: dict[str, Any] = {"path": str(path), "level0_dims": rows[next(iter(rows))]["level0_dims"], "rows": rows}
    out["speedup_cold"] = (rows["sliding window, cpu-small, trained (cold)"]["wall_s"]
                           / rows["dual attention, cpu-small, trained (cold)"]["wall_s"])
    out["speedup"] = (rows["sliding window, cpu-small, trained (warm)"]["wall_s"]
                      / rows["dual attention, cpu-small, trained (warm)"]["wall_s"])
    out["fraction"] = rows["dual attention, cpu-small, trained (warm)"]["fraction"]
    if not args.skip_giga_paper:
        out["speedup_paper"] = (rows["sliding window, paper sizes (224² at 20x, width 64), untrained"]["wall_s"]
                                / rows["dual attention, paper-her2 sizes, untrained (warm)"]["wall_s"])
        out["fraction_paper"] = rows["dual attention, paper-her2 sizes, untrained (warm)"]["fraction"]
    return out


def saved_her2_models(args: argparse.Namespace) -> dict[str, Any]:
    """The HER2 dual attention checkpoint and sliding-window ResNet18 of a previous run in --work-dir."""
    from dual_attention.checkpoint import load_checkpoint

    work = Path(args.work_dir) / "her2"
    model, config, _ = load_checkpoint(work / "dual_attention_checkpoint")
    window_model, window_config, _ = load_sliding_window_model(work / SLIDING_WINDOW_MODEL_FILE)
    return {"task": "her2", "config": config, "model": model, "window_model": window_model,
            "window_config": window_config}


# -- tables --------------------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    return format(value, spec)


def tables(results: list[dict[str, Any]], giga: dict[str, Any] | None, args: argparse.Namespace,
           total_s: float) -> str:
    lines = [f"Command: `.venv/bin/python benchmarks/bench_cohort_study.py {' '.join(args.argv)}`".rstrip(),
             f"(whole study {total_s / 60:.1f} min on this 2-core machine shared with other engineers' jobs).", ""]
    for result in results:
        task = result["task"]
        lines += [f"**{task.upper()}**: {result['n_train']} training / {result['n_test']} test slides of "
                  f"{args.slide_px}² level-0 px (folds {args.test_folds} held out); dual attention trained "
                  f"{args.epochs} epochs in-process in {result['timings']['train_dual_attention_s']:.0f}s, "
                  f"ResNet18 (width {result['window_config'].resnet_width}) on "
                  f"{result['window_info']['n_train_patches']} patches in "
                  f"{result['timings']['train_sliding_window_s']:.0f}s.", ""]
        header = "| method | accuracy | macro F1 | AUROC |"
        rule = "|---|---|---|---|"
        if task == "her2":
            header += " agreement pts | combined pts | weighted conf. |"
            rule += "---|---|---|"
        header += " wall s / slide | % level 0 read | tumour in tiles (mean / any) |"
        rule += "---|---|---|"
        lines += [header, rule]
        for method in METHODS:
            s = result["summaries"][method]
            row = f"| {method} | {_fmt(s.get('accuracy'))} | {_fmt(s.get('f1_macro'))} | {_fmt(s.get('auroc'))} |"
            if task == "her2":
                row += (f" {s.get('agreement_points', 'n/a')} / {s.get('agreement_points_max', 'n/a')} |"
                        f" {_fmt(s.get('combined_points'), '.1f')} | {_fmt(s.get('weighted_confidence'))} |")
            row += f" {_fmt(s.get('wall_time_per_slide_s'), '.2f')} | {_fmt(100 * s.get('fraction_level0_read', np.nan), '.2f')} |"
            row += f" {_fmt(s.get('tiles_mean_tumour_fraction'), '.2f')} / {_fmt(s.get('tiles_tiles_with_tumour'), '.2f')} |"
            lines.append(row)
        lines.append("")
    if giga is not None:
        w, h = giga["level0_dims"]
        lines += [f"**Per-slide cost on one {w}×{h} slide ({w * h / 1e9:.2f} gigapixels), same tile pool, "
                  "opening the slide and its thumbnail / mask included:**", "",
                  "| method | wall time (s) | of which thumbnail + mask (s) | tiles / patches | level-0 px read "
                  "| % of level 0 |",
                  "|---|---|---|---|---|---|"]
        for name, d in giga["rows"].items():
            lines.append(f"| {name} | {d['wall_s']:.2f} | {d['thumbnail_s']:.2f} | {d['units']} | {d['pixels']:,} |"
                         f" {100 * d['fraction']:.4f} |")
        lines += ["", f"Speed-up of dual attention over the sliding window on this slide: cpu-small "
                  f"**{giga['speedup']:.0f}×** warm ({giga['speedup_cold']:.0f}× cold)"
                  + (f", paper sizes **{giga['speedup_paper']:.0f}×**." if "speedup_paper" in giga else "."), ""]
    lines += targets(results, giga)
    return "\n".join(lines)


def targets(results: list[dict[str, Any]], giga: dict[str, Any] | None) -> list[str]:
    lines = ["| target | measured | met |", "|---|---|---|"]
    for result in results:
        s = result["summaries"]
        da, rs, sw = (s[m].get("accuracy", np.nan) for m in METHODS)
        gap = 100 * (da - rs)
        lines.append(f"| {result['task']}: dual attention ≥ random sampling + 15 accuracy points | "
                     f"{gap:+.1f} points | {'yes' if gap >= 15 else 'no'} |")
        ratio = da / sw if sw else float("nan")
        lines.append(f"| {result['task']}: dual attention ≥ 95% of sliding-window accuracy | {100 * ratio:.0f}% | "
                     f"{'yes' if ratio >= 0.95 else 'no'} |")
    if giga is not None:
        for key, label in (("speedup", "cpu-small, warm"), ("speedup_paper", "paper sizes, warm")):
            if key in giga:
                lines.append(f"| ≥ 100× faster per slide than sliding window (≥ 1 gigapixel; {label}) | "
                             f"{giga[key]:.0f}× | {'yes' if giga[key] >= 100 else 'no'} |")
        for key, label in (("fraction", "cpu-small"), ("fraction_paper", "paper sizes")):
            if key in giga:
                lines.append(f"| ≤ 1% of level-0 pixels read (gigapixel slide; {label}) | {100 * giga[key]:.4f}% | "
                             f"{'yes' if giga[key] <= 0.01 else 'no'} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="her2,mmr")
    parser.add_argument("--n-slides", type=int, default=48, help="slides per task (4 folds)")
    parser.add_argument("--slide-px", type=int, default=2048, help="level-0 side of the cohort slides")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--test-folds", default="0,1", help="folds held out for testing (of 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="extra config override SECTION.FIELD=VALUE")
    parser.add_argument("--giga-px", type=int, default=32768)
    parser.add_argument("--giga-slide", default=None, help="an existing gigapixel HER2 slide to time on")
    parser.add_argument("--skip-giga", action="store_true")
    parser.add_argument("--skip-giga-paper", action="store_true", help="no paper-size timing on the gigapixel slide")
    parser.add_argument("--coverage-only", action="store_true",
                        help="only the tumour coverage of each method's tiles, from a previous run's outputs")
    parser.add_argument("--giga-only", action="store_true",
                        help="only the gigapixel timing, with the HER2 models a previous run saved in --work-dir")
    parser.add_argument("--num-readers", type=int, default=2)
    parser.add_argument("--work-dir", default="/tmp/cohort-study")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="intra-op threads; on 2 cores shared with other jobs, 2 threads spin-wait and a "
                             "ResNet18 step measured 10-20x slower than with 1")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    args.argv = sys.argv[1:]
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    if args.coverage_only:
        print("| task | method | mean tumour fraction in tiles | tiles touching tumour | slide tumour fraction |")
        print("|---|---|---|---|---|")
        for task in args.tasks.split(","):
            for method in METHODS:
                c = tumour_coverage(Path(args.work_dir) / task, method)
                print(f"| {task} | {method} | {c['mean_tumour_fraction']:.2f} | {c['tiles_with_tumour']:.2f} | "
                      f"{c['slide_tumour_fraction']:.2f} |")
        return
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    from jobs.runtime.tile_plane import TilePool

    started = time.perf_counter()
    results = []
    giga = None
    with RaySession(log_to_driver=False):
        pool = TilePool(num_actors=args.num_readers)
        try:
            if args.giga_only:
                her2 = saved_her2_models(args)
            else:
                for task in args.tasks.split(","):
                    results.append(run_task(task, args, pool))
                her2 = next((r for r in results if r["task"] == "her2"), None)
            if her2 is not None and not args.skip_giga:
                giga = gigapixel_timing(her2, args, pool)
        finally:
            pool.shutdown()
    total_s = time.perf_counter() - started
    text = tables(results, giga, args, total_s)
    print(text)
    (Path(args.work_dir) / "cohort_study.md").write_text(text + "\n")
    raw = {"args": {k: v for k, v in vars(args).items()}, "total_s": total_s, "giga": giga,
           "tasks": [{k: v for k, v in r.items() if k not in ("config", "model", "window_model", "window_config")}
                     | {"window_config": r["window_config"].to_dict()} for r in results]}
    (Path(args.work_dir) / "cohort_study.json").write_text(json.dumps(raw, indent=1, default=str))


if __name__ == "__main__":
    main()
