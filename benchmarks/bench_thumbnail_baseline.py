"""Is the synthetic label hidden from the thumbnail and visible at 40x? Both measured on one cohort.

* Thumbnail baseline: colour histograms of the tissue pixels of each slide's 1/32 thumbnail (RGB joint
  histogram, and haematoxylin/DAB histograms after colour deconvolution), logistic regression,
  stratified k-fold cross-validated accuracy. For 4-class HER2 it must stay <= 0.6.
* High-power check: level-0 patches (64x64 at 40x) from inside the tumour mask, DAB statistics that
  describe membrane rings and nuclear staining (DAB level, DAB minus its local mean: rings and nuclei
  are thin bright residuals, cytoplasmic blush is smooth), the same logistic regression and CV.

    .venv/bin/python benchmarks/bench_thumbnail_baseline.py --task her2 --n-slides 64
    .venv/bin/python benchmarks/bench_thumbnail_baseline.py --task mmr --n-slides 32

Prints a markdown table row; the numbers in benchmarks/RESULTS.md come from here.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.color import rgb2hed
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dual_attention.manifest import read_manifest
from dual_attention.slides import Level0Box, open_slide, tissue_mask
from dual_attention.synthetic import FIELD_PX, write_cohort

PATCH_LEVEL0_PX = 64
warnings.filterwarnings("ignore", category=FutureWarning, module="sklearn")  # LogisticRegressionCV defaults
PATCHES_PER_SLIDE = 16


def thumbnail_rgb_histogram(thumbnail: np.ndarray, mask: np.ndarray, bins: int = 8) -> np.ndarray:
    pixels = thumbnail[mask] if mask.any() else thumbnail.reshape(-1, 3)
    hist, _ = np.histogramdd(pixels, bins=(bins,) * 3, range=((0, 256),) * 3)
    return (hist / max(1, len(pixels))).ravel()


def thumbnail_hed_histogram(thumbnail: np.ndarray, mask: np.ndarray, bins: int = 24) -> np.ndarray:
    hed = rgb2hed(thumbnail)
    pixels = hed[mask] if mask.any() else hed.reshape(-1, 3)
    features = []
    for channel in (0, 2):  # haematoxylin, DAB
        hist, _ = np.histogram(pixels[:, channel], bins=bins, range=(0.0, 0.25))
        features += [hist / max(1, len(pixels)), [pixels[:, channel].mean(), pixels[:, channel].std()]]
    features.append([mask.mean()])  # tissue fraction
    return np.concatenate(features)


def high_power_features(patches: np.ndarray) -> np.ndarray:
    """DAB statistics of level-0 patches (n, 64, 64, 3), averaged over the patches of one slide."""
    features = []
    for patch in patches:
        dab = rgb2hed(patch)[..., 2]
        residual = dab - ndimage.uniform_filter(dab, size=9)  # thin structures (rings, nuclei) stand out
        features.append(
            [
                dab.mean(),
                *np.percentile(dab, [10, 50, 90]),
                *np.percentile(residual, [50, 75, 90, 97, 99]),
                (residual > 0.01).mean(),
                (residual > 0.02).mean(),
                (residual > 0.04).mean(),
            ]
        )
    return np.mean(features, axis=0)


def tumour_patches(slide, mask_path: str, rng: np.random.Generator) -> np.ndarray:
    mask = np.asarray(Image.open(mask_path)) > 0
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        raise ValueError(f"{mask_path}: empty tumour mask")
    pick = rng.choice(len(rows), size=PATCHES_PER_SLIDE, replace=len(rows) < PATCHES_PER_SLIDE)
    width, height = slide.dimensions
    patches = []
    for r, c in zip(rows[pick], cols[pick], strict=True):
        x0 = int(np.clip((c + 0.5) * FIELD_PX - PATCH_LEVEL0_PX / 2, 0, width - PATCH_LEVEL0_PX))
        y0 = int(np.clip((r + 0.5) * FIELD_PX - PATCH_LEVEL0_PX / 2, 0, height - PATCH_LEVEL0_PX))
        patches.append(slide.read_box(Level0Box(x0, y0, PATCH_LEVEL0_PX, PATCH_LEVEL0_PX)))
    return np.stack(patches)


def save_examples(examples: dict[int, tuple[np.ndarray, np.ndarray]], task: str, path: Path) -> None:
    """One slide per class: its thumbnail (what the baseline sees) over a 40x tumour patch (what decides)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dual_attention.config import CLASS_NAMES

    labels = sorted(examples)
    fig, axes = plt.subplots(2, len(labels), figsize=(3 * len(labels), 6.2), squeeze=False)
    for i, label in enumerate(labels):
        thumbnail, patch = examples[label]
        axes[0, i].imshow(thumbnail)
        axes[0, i].set_title(f"{task} {CLASS_NAMES[task][label]}: thumbnail 1/32")
        axes[1, i].imshow(patch, interpolation="nearest")
        axes[1, i].set_title(f"40x, {PATCH_LEVEL0_PX} px in tumour")
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def cv_accuracy(features: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> tuple[float, float]:
    # Regularisation chosen by an inner CV on the training folds only (nested): fair to both models.
    model = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=8, max_iter=5000))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_score(model, features, labels, cv=splitter, scoring="accuracy")
    return float(scores.mean()), float(scores.std())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="her2", choices=("her2", "mmr"))
    parser.add_argument("--n-slides", type=int, default=64)
    parser.add_argument("--size-level0-px", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--cv-folds", type=int, default=5)
    parser.add_argument("--cohort", type=Path, default=None, help="reuse this cohort folder (else a temp one)")
    parser.add_argument("--figure", type=Path, default=None, help="save example thumbnails and 40x patches here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-thumb-") as scratch:
        cohort = args.cohort or Path(scratch)
        manifest_path = cohort / "manifest.parquet"
        start = time.perf_counter()
        if not manifest_path.exists():
            write_cohort(cohort, args.task, args.n_slides, args.seed, slide_level0_px=args.size_level0_px)
        generation_s = time.perf_counter() - start
        rows = read_manifest(manifest_path).to_pylist()
        rng = np.random.default_rng(args.seed)
        rgb_features, hed_features, hp_features, labels = [], [], [], []
        examples: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for row in rows:
            with open_slide(row["path"]) as slide:
                thumbnail = slide.thumbnail(32)
                mask = tissue_mask(thumbnail, min_area_thumb_px=4)
                rgb_features.append(thumbnail_rgb_histogram(thumbnail, mask))
                hed_features.append(thumbnail_hed_histogram(thumbnail, mask))
                patches = tumour_patches(slide, row["tumour_mask_path"], rng)
                hp_features.append(high_power_features(patches))
                examples.setdefault(row["label"], (thumbnail, patches[0]))
            labels.append(row["label"])
        if args.figure:
            save_examples(examples, args.task, args.figure)
        labels = np.array(labels)
        rgb_acc = cv_accuracy(np.array(rgb_features), labels, args.cv_folds, args.seed)
        hed_acc = cv_accuracy(np.array(hed_features), labels, args.cv_folds, args.seed)
        both_acc = cv_accuracy(np.hstack([rgb_features, hed_features]), labels, args.cv_folds, args.seed)
        hp_acc = cv_accuracy(np.array(hp_features), labels, args.cv_folds, args.seed)
    n_classes = len(set(labels.tolist()))
    print(f"cohort: {args.task}, {len(rows)} slides, {args.size_level0_px}^2 level 0, seed {args.seed}, "
          f"generated in {generation_s:.1f} s; chance = {1 / n_classes:.2f}")
    print("| task | slides | thumbnail RGB hist | thumbnail H/DAB hist | thumbnail both | 40x tumour patches |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {args.task} ({n_classes} classes) | {len(rows)} | {rgb_acc[0]:.2f} ± {rgb_acc[1]:.2f} | "
        f"{hed_acc[0]:.2f} ± {hed_acc[1]:.2f} | {both_acc[0]:.2f} ± {both_acc[1]:.2f} | "
        f"{hp_acc[0]:.2f} ± {hp_acc[1]:.2f} |"
    )


if __name__ == "__main__":
    main()
