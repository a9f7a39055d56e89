"""One synthetic slide (``write_synthetic_slide``), a cohort of them with its Parquet manifest
(``write_cohort``), and the ``dual-attention synth`` command.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from dual_attention.config import CLASS_NAMES, NUM_CLASSES
from dual_attention.manifest import ManifestRow, write_manifest
from dual_attention.synthetic.layout import (
    CELL_PX,
    FIELD_PX,
    MPP_40X,
    OBJECTIVE_POWER,
    RENDER_CHUNK_PX,
    SyntheticError,
    _check_task_label,
    make_layout,
)
from dual_attention.synthetic.pyramid import _pyramid_pixels, write_pyramid
from dual_attention.synthetic.render import render_region


def write_synthetic_slide(
    path: str | Path,
    task: str,
    label: int,
    seed: int,
    width_level0_px: int = 4096,
    height_level0_px: int = 4096,
    mask_path: str | Path | None = None,
    objective_power: float | None = OBJECTIVE_POWER,
    progress: bool = False,
) -> dict[str, Any]:
    """Write one synthetic slide (and its tumour mask PNG at 1/32 when ``mask_path`` is given).

    Returns a dict describing it: path, task, label, seed, width/height_level0_px, mpp, level
    dimensions, tumour_mask_path, tumour_fraction (of the slide area), and the slide-level parameters.
    """
    _check_task_label(task, label)
    for name, value in (("width_level0_px", width_level0_px), ("height_level0_px", height_level0_px)):
        if not isinstance(value, int | np.integer) or value < 2 * CELL_PX:
            raise SyntheticError(f"{name} must be an integer >= {2 * CELL_PX}, got {value!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layout = make_layout(task, label, seed, width_level0_px, height_level0_px)

    def render_strip(y0: int, rows: int) -> np.ndarray:
        strip = np.empty((rows, width_level0_px, 3), np.uint8)
        for x0 in range(0, width_level0_px, RENDER_CHUNK_PX):
            cols = min(RENDER_CHUNK_PX, width_level0_px - x0)
            strip[:, x0 : x0 + cols] = render_region(layout, x0, y0, cols, rows)
        return strip

    bar = tqdm(total=_pyramid_pixels(width_level0_px, height_level0_px), unit="px", unit_scale=True,
               desc=path.name, disable=not progress, leave=False)
    note = f"task={task}|label={label}|seed={seed}"
    with bar:
        dims = write_pyramid(path, width_level0_px, height_level0_px, render_strip,
                             objective_power=objective_power, note=note, progress=bar)
    tumour_mask = layout.tumour_mask()
    if mask_path is not None:
        mask_path = Path(mask_path)
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((tumour_mask * 255).astype(np.uint8)).save(mask_path)
    return {
        "path": str(path),
        "task": task,
        "label": int(label),
        "seed": int(seed),
        "width_level0_px": int(width_level0_px),
        "height_level0_px": int(height_level0_px),
        "mpp": MPP_40X,
        "level_dimensions": dims,
        "tumour_mask_path": str(mask_path) if mask_path is not None else None,
        "tumour_mask_downsample": FIELD_PX,
        "tumour_fraction": float(tumour_mask.mean()),
        "params": layout.params,
    }


def slide_seed(cohort_seed: int, index: int) -> int:
    """The seed of slide ``index`` of a cohort (63-bit, recorded in the manifest)."""
    return int(np.random.SeedSequence([cohort_seed, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def plan_cohort(task: str, n_slides: int, seed: int, n_folds: int) -> list[tuple[str, int, int, int]]:
    """(slide_id, label, fold, slide_seed) per slide: labels balanced, folds stratified by label."""
    if task not in NUM_CLASSES:
        raise SyntheticError(f"task must be one of {tuple(NUM_CLASSES)}, got {task!r}")
    n_classes = NUM_CLASSES[task]
    if n_slides < 1:
        raise SyntheticError(f"n_slides must be >= 1, got {n_slides}")
    if n_folds < 1:
        raise SyntheticError(f"n_folds must be >= 1, got {n_folds}")
    rng = np.random.default_rng([seed, 0xC0407])
    labels = rng.permutation(np.arange(n_slides) % n_classes)
    folds = np.zeros(n_slides, np.int64)
    # Deal each class's slides round-robin over folds, continuing where the previous class stopped,
    # so fold sizes differ by at most one and each fold sees every class when there are enough slides.
    next_fold = 0
    for c in range(n_classes):
        for i in np.flatnonzero(labels == c):
            folds[i] = next_fold
            next_fold = (next_fold + 1) % n_folds
    width = len(str(n_slides - 1))
    return [
        (f"{task}-{seed}-{i:0{width}d}", int(labels[i]), int(folds[i]), slide_seed(seed, i)) for i in range(n_slides)
    ]


def _write_one(job: tuple[str, str, int, int, int, str, int, float | None]) -> dict[str, Any]:
    """One cohort slide (a picklable job for the process pool)."""
    out_dir, task, label, fold, seed, slide_id, size, objective_power = job
    info = write_synthetic_slide(
        Path(out_dir) / "slides" / f"{slide_id}.tiff",
        task,
        label,
        seed,
        size,
        size,
        mask_path=Path(out_dir) / "masks" / f"{slide_id}_tumour.png",
        objective_power=objective_power,
    )
    info.update(slide_id=slide_id, fold=fold)
    return info


def write_cohort(
    out_dir: str | Path,
    task: str,
    n_slides: int,
    seed: int,
    slide_level0_px: int = 4096,
    n_folds: int = 4,
    workers: int | None = None,
    objective_power: float | None = OBJECTIVE_POWER,
    progress: bool = True,
) -> Path:
    """Write ``n_slides`` slides to ``out_dir/slides/*.tiff``, tumour masks (1/32, PNG) to
    ``out_dir/masks/``, and ``out_dir/manifest.parquet`` (paths relative to ``out_dir``); return the
    manifest path. Labels are balanced, folds stratified; pixels depend only on ``seed``.
    """
    out_dir = Path(out_dir)
    plan = plan_cohort(task, n_slides, seed, n_folds)
    if not isinstance(slide_level0_px, int) or slide_level0_px < 2 * CELL_PX:
        raise SyntheticError(f"slide_level0_px must be an integer >= {2 * CELL_PX}, got {slide_level0_px!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    workers = workers or min(2, os.cpu_count() or 1, n_slides)
    jobs = [(str(out_dir), task, lab, fold, s, sid, slide_level0_px, objective_power) for sid, lab, fold, s in plan]
    infos: list[dict[str, Any]] = []
    bar = tqdm(total=len(jobs), desc=f"synth {task}", unit="slide", disable=not progress)
    with bar:
        if workers <= 1:
            for job in jobs:
                infos.append(_write_one(job))
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for info in pool.map(_write_one, jobs):
                    infos.append(info)
                    bar.update()
    rows = [
        ManifestRow(
            slide_id=info["slide_id"],
            path=os.path.relpath(info["path"], out_dir),
            label=info["label"],
            task=task,
            fold=info["fold"],
            seed=info["seed"],
            tumour_mask_path=os.path.relpath(info["tumour_mask_path"], out_dir),
            width_level0_px=info["width_level0_px"],
            height_level0_px=info["height_level0_px"],
            mpp=info["mpp"],
        )
        for info in infos
    ]
    return write_manifest(rows, out_dir / "manifest.parquet")


def cohort_summary(manifest_path: str | Path) -> str:
    """Counts per label and fold, and the size on disk, as printable text."""
    from dual_attention.manifest import read_manifest

    table = read_manifest(manifest_path).to_pylist()
    task = table[0]["task"]
    names = CLASS_NAMES[task]
    folds = sorted({r["fold"] for r in table})
    lines = [f"cohort {Path(manifest_path).parent} ({task}, {len(table)} slides)"]
    header = "label".ljust(10) + "".join(f"fold {f}".rjust(8) for f in folds) + "total".rjust(8)
    lines.append(header)
    for label, name in enumerate(names):
        counts = [sum(1 for r in table if r["label"] == label and r["fold"] == f) for f in folds]
        lines.append(f"{label} ({name})".ljust(10) + "".join(f"{c:8d}" for c in counts) + f"{sum(counts):8d}")
    files = [Path(r["path"]) for r in table] + [Path(r["tumour_mask_path"]) for r in table if r.get("tumour_mask_path")]
    size = sum(f.stat().st_size for f in files if f.exists()) + Path(manifest_path).stat().st_size
    lines.append(f"size on disk: {size / 2**20:.1f} MiB; manifest: {manifest_path}")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m dual_attention.synthetic",
        description="Write a synthetic IHC cohort: pyramidal JPEG TIFF slides (40x, 0.25 um/px), "
        "tumour masks at 1/32 and a Parquet manifest.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--task", required=True, choices=tuple(NUM_CLASSES))
    parser.add_argument("--n-slides", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size-level0-px", type=int, default=4096, help="side of each square slide at level 0")
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: min(2, cores))")
    parser.add_argument(
        "--plain-tiff",
        action="store_true",
        help="write a generic TIFF (no Aperio-style description: OpenSlide then reports no objective power)",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        manifest = write_cohort(
            args.out,
            args.task,
            args.n_slides,
            args.seed,
            slide_level0_px=args.size_level0_px,
            n_folds=args.folds,
            workers=args.workers,
            objective_power=None if args.plain_tiff else OBJECTIVE_POWER,
        )
    except SyntheticError as error:
        parser.error(str(error))
    print(cohort_summary(manifest))
    print(f"written in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
