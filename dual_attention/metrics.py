"""Slide-level aggregation arithmetic and evaluation metrics.

HER2 contest scoring (Qaiser et al. 2018, "HER2 challenge contest: a detailed assessment of automated
HER2 scoring algorithms in whole slide images of breast cancer tissues", Histopathology 72(2):227-238):

- agreement points: ``HER2_AGREEMENT_POINTS[ground_truth][predicted]``, at most 15 per case;
- weighted confidence: per case, the confidence if the prediction is right and (1 - confidence) if wrong,
  averaged over cases (rewards being sure when right and unsure when wrong);
- combined points: per case, agreement points x confidence, summed.

The table and the two confidence rules are as recalled in the project's DESIGN.md, not copied from the
paper; a correction is one edit of ``HER2_AGREEMENT_POINTS`` or of the two functions below.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

HER2_CONTEST_SOURCE = (
    "Qaiser et al. 2018, Histopathology 72(2): HER2 scoring contest, agreement points per case "
    "(as recalled in DESIGN.md)"
)
# rows: ground truth 0, 1+, 2+, 3+; columns: predicted 0, 1+, 2+, 3+
HER2_AGREEMENT_POINTS: np.ndarray = np.array(
    [
        [15, 15, 10, 0],
        [15, 15, 10, 0],
        [5, 5, 15, 10],
        [0, 0, 5, 15],
    ],
    dtype=np.int64,
)


def _labels(values: Sequence[int] | np.ndarray, name: str, num_classes: int) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size and (array.min() < 0 or array.max() >= num_classes or not np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{name} must hold integer classes in [0, {num_classes}), got {array.tolist()}")
    return array.astype(np.int64)


def her2_agreement_points(ground_truth: Sequence[int], predicted: Sequence[int]) -> int:
    """Total contest agreement points (max 15 per case)."""
    truth = _labels(ground_truth, "ground_truth", 4)
    pred = _labels(predicted, "predicted", 4)
    if truth.shape != pred.shape:
        raise ValueError(f"ground_truth has {truth.size} cases but predicted has {pred.size}")
    return int(HER2_AGREEMENT_POINTS[truth, pred].sum())


def _confidences(confidence: Sequence[float], n: int) -> np.ndarray:
    conf = np.asarray(confidence, dtype=np.float64)
    if conf.shape != (n,):
        raise ValueError(f"confidence must hold one value per case ({n}), got shape {conf.shape}")
    if conf.size and (conf.min() < 0 or conf.max() > 1):
        raise ValueError(f"confidence values must lie in [0, 1], got min {conf.min()} max {conf.max()}")
    return conf


def weighted_confidence(ground_truth: Sequence[int], predicted: Sequence[int], confidence: Sequence[float]) -> float:
    """Mean over cases of confidence when right and (1 - confidence) when wrong, in [0, 1]."""
    truth = _labels(ground_truth, "ground_truth", 4)
    pred = _labels(predicted, "predicted", 4)
    conf = _confidences(confidence, truth.size)
    if truth.size == 0:
        raise ValueError("weighted_confidence needs at least one case")
    return float(np.where(truth == pred, conf, 1.0 - conf).mean())


def combined_points(ground_truth: Sequence[int], predicted: Sequence[int], confidence: Sequence[float]) -> float:
    """Sum over cases of agreement points x confidence."""
    truth = _labels(ground_truth, "ground_truth", 4)
    pred = _labels(predicted, "predicted", 4)
    conf = _confidences(confidence, truth.size)
    return float((HER2_AGREEMENT_POINTS[truth, pred] * conf).sum())


def f1(ground_truth: Sequence[int], predicted: Sequence[int], average: str = "macro") -> float:
    """F1 by scikit-learn (macro over classes by default)."""
    from sklearn.metrics import f1_score  # here, not at the top: scoring processes never pay its import

    return float(f1_score(ground_truth, predicted, average=average, zero_division=0))


def auroc(ground_truth: Sequence[int], class_probabilities: np.ndarray) -> float:
    """AUROC by scikit-learn: binary from the positive class's probability, one-vs-rest macro otherwise."""
    probs = np.asarray(class_probabilities, dtype=np.float64)
    truth = np.asarray(ground_truth)
    if probs.ndim != 2 or probs.shape[0] != truth.size:
        raise ValueError(f"class_probabilities must be (n_cases, n_classes), got {probs.shape} for {truth.size} cases")
    if np.unique(truth).size < 2:
        raise ValueError("AUROC needs both positive and negative cases in ground_truth")
    from sklearn.metrics import roc_auc_score

    if probs.shape[1] == 2:
        return float(roc_auc_score(truth, probs[:, 1]))
    probs = probs / probs.sum(axis=1, keepdims=True)
    return float(roc_auc_score(truth, probs, multi_class="ovr", average="macro", labels=list(range(probs.shape[1]))))


# The one validation figure a task's runs are ranked by (training's best-fold alias and epoch line, Tune's
# default metric), as a key of ``slide_metrics``. HER2: the contest's own figure. MMR: macro F1, not AUROC:
# AUROC is undefined on a validation fold that holds one class, and then ranks nothing.
PRIMARY_METRIC: dict[str, str] = {"her2": "agreement_points_per_case", "mmr": "f1_macro"}


def primary_metric(task: str) -> str:
    """The ``slide_metrics`` key a ``task``'s runs are ranked by (higher is better)."""
    if task not in PRIMARY_METRIC:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(PRIMARY_METRIC)}")
    return PRIMARY_METRIC[task]


def slide_metrics(task: str, labels: Sequence[int], predicted: Sequence[int],
                  probabilities: Sequence[Sequence[float]] | np.ndarray, confidences: Sequence[float]
                  ) -> dict[str, Any]:
    """Slide-level metrics of one set of predictions, the same for training's validation, evaluation and
    the baselines: ``n_slides``, ``accuracy``, ``f1_macro``, ``auroc`` and, for HER2, the contest's
    ``agreement_points`` (of ``agreement_points_max`` = 15 per case), ``agreement_points_per_case``,
    ``weighted_confidence`` and ``combined_points``. AUROC is None, with ``auroc_note`` saying why, when it
    is undefined (a single class among the labels, or a class absent from them)."""
    labels_a, predicted_a = np.asarray(labels, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    n = int(labels_a.size)
    out: dict[str, Any] = {"n_slides": n}
    if n == 0:
        return out
    out["accuracy"] = float((labels_a == predicted_a).mean())
    out["f1_macro"] = f1(labels_a, predicted_a, average="macro")
    probs = np.asarray(probabilities, dtype=np.float64)
    from sklearn.exceptions import UndefinedMetricWarning

    try:
        with warnings.catch_warnings():  # an undefined AUROC is reported below, not warned about
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            out["auroc"] = auroc(labels_a, probs)
    except ValueError as error:
        out["auroc"], out["auroc_note"] = None, str(error)
    if out["auroc"] is not None and not math.isfinite(out["auroc"]):  # a class absent from the labels
        missing = sorted(set(range(probs.shape[1])) - set(labels_a.tolist()))
        out["auroc"], out["auroc_note"] = None, f"AUROC undefined: classes {missing} absent from the labels"
    if task == "her2":
        points = her2_agreement_points(labels_a, predicted_a)
        out["agreement_points"] = points
        out["agreement_points_max"] = 15 * n
        out["agreement_points_per_case"] = points / n
        out["weighted_confidence"] = weighted_confidence(labels_a, predicted_a, confidences)
        out["combined_points"] = combined_points(labels_a, predicted_a, confidences)
    return out


def dice(mask_a: np.ndarray, mask_b: np.ndarray) -> float:
    """Dice coefficient 2|A∩B| / (|A| + |B|) of two boolean masks; 1.0 when both are empty."""
    a, b = np.asarray(mask_a, dtype=bool), np.asarray(mask_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


# -- slide-level aggregation -------------------------------------------------------------------------------


def aggregate_tile_probabilities(tile_probabilities: np.ndarray, task: str) -> tuple[int, float, np.ndarray]:
    """(n_tiles, C) tile class probabilities -> (slide class, confidence, slide class probabilities).

    HER2: the dominant tile class (most tiles predict it; ties go to the class with the higher mean
    probability), confidence = the mean tile probability of that class.
    MMR: the class with the highest mean probability, confidence = that mean probability.
    The slide class probabilities are the mean over tiles in both cases.
    """
    probs = np.asarray(tile_probabilities, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"need (n_tiles >= 1, n_classes) tile probabilities, got shape {probs.shape}")
    mean = probs.mean(axis=0)
    if task == "her2":
        votes = np.bincount(probs.argmax(axis=1), minlength=probs.shape[1])
        candidates = np.flatnonzero(votes == votes.max())
        predicted = int(candidates[np.argmax(mean[candidates])])
    elif task == "mmr":
        predicted = int(np.argmax(mean))
    else:
        raise ValueError(f"unknown task {task!r}; expected 'her2' or 'mmr'")
    return predicted, float(mean[predicted]), mean


def combine_fold_probabilities(fold_probabilities: Sequence[np.ndarray]) -> tuple[int, float, np.ndarray]:
    """Mean of the folds' slide class probabilities -> (class, confidence, mean probabilities)."""
    stacked = np.asarray([np.asarray(p, dtype=np.float64) for p in fold_probabilities])
    if stacked.ndim != 2 or stacked.shape[0] == 0:
        raise ValueError(f"need one (n_classes,) probability vector per fold, got shape {stacked.shape}")
    mean = stacked.mean(axis=0)
    predicted = int(np.argmax(mean))
    return predicted, float(mean[predicted]), mean


# -- is the model learning? (attention and glimpse diagnostics) ------------------------------------------------


def attention_entropy_normalised(attention_map: np.ndarray, tissue_mask: np.ndarray) -> float:
    """Entropy of the attention over tissue ÷ log(number of tissue pixels): 1.0 for a flat map, towards 0
    as the mass concentrates. NaN without at least two tissue pixels."""
    tissue = np.asarray(tissue_mask, dtype=bool)
    values = np.asarray(attention_map, dtype=np.float64)[tissue]
    if values.size < 2 or not values.sum() > 0:
        return float("nan")
    p = values / values.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / np.log(values.size))


def attention_on_tumour_ratio(attention_map: np.ndarray, tissue_mask: np.ndarray, tumour_mask: np.ndarray) -> float:
    """Attention mass on tumour ÷ tumour's share of the tissue: 1.0 for attention that ignores tumour,
    1 / share when all the mass is on tumour. NaN when the slide's tissue holds no tumour (or is all tumour)."""
    tissue = np.asarray(tissue_mask, dtype=bool)
    tumour = np.asarray(tumour_mask, dtype=bool) & tissue
    values = np.asarray(attention_map, dtype=np.float64)
    share = tumour.sum() / max(int(tissue.sum()), 1)
    total = values[tissue].sum()
    if not 0 < share < 1 or not total > 0:
        return float("nan")
    return float(values[tumour].sum() / total / share)


def tumour_fraction_of_boxes(level0_boxes: Sequence[Any], tumour_mask: np.ndarray, downsample: int) -> list[float]:
    """For each level-0 box (``x0, y0, width, height``), the fraction of it that the tumour mask (at
    1/``downsample`` of level 0) covers."""
    mask = np.asarray(tumour_mask, dtype=bool)
    fractions = []
    for box in level0_boxes:
        r0, c0 = int(box.y0 // downsample), int(box.x0 // downsample)
        r1 = max(r0 + 1, int(np.ceil((box.y0 + box.height) / downsample)))
        c1 = max(c0 + 1, int(np.ceil((box.x0 + box.width) / downsample)))
        window = mask[max(r0, 0):r1, max(c0, 0):c1]
        fractions.append(float(window.mean()) if window.size else 0.0)
    return fractions


def glimpse_spread(locations: np.ndarray) -> float:
    """How much the glimpse trails differ between tiles: the std over tiles of each glimpse's (x, y) in
    [-1, 1]² (mean of x and y), averaged over glimpses 2..T (the first may be drawn at random). 0 means
    every tile got the same path (a collapsed policy). ``locations``: (tiles, T, 2)."""
    trails = np.asarray(locations, dtype=np.float64)
    if trails.ndim != 3 or trails.shape[0] < 2:
        return float("nan")
    later = trails[:, 1:] if trails.shape[1] > 1 else trails
    return float(later.std(axis=0).mean())
