"""Contest points, F1/AUROC, dice, and slide-level aggregation arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from dual_attention import metrics


def test_agreement_table_is_the_documented_one() -> None:
    table = metrics.HER2_AGREEMENT_POINTS
    assert table.shape == (4, 4) and np.all(np.diag(table) == 15) and table.max() == 15
    assert table.tolist() == [[15, 15, 10, 0], [15, 15, 10, 0], [5, 5, 15, 10], [0, 0, 5, 15]]
    assert "Qaiser" in metrics.HER2_CONTEST_SOURCE


def test_agreement_points() -> None:
    # (0->0) 15, (1->0) 15, (2->3) 10, (3->1) 0, (3->2) 5
    assert metrics.her2_agreement_points([0, 1, 2, 3, 3], [0, 0, 3, 1, 2]) == 45
    with pytest.raises(ValueError, match="predicted must hold integer classes"):
        metrics.her2_agreement_points([0], [4])
    with pytest.raises(ValueError, match="2 cases"):
        metrics.her2_agreement_points([0, 1], [0])


def test_weighted_confidence_and_combined_points() -> None:
    truth, pred, conf = [0, 2, 3], [0, 3, 3], [0.9, 0.8, 0.6]
    # right, wrong, right: (0.9 + (1 - 0.8) + 0.6) / 3
    assert metrics.weighted_confidence(truth, pred, conf) == pytest.approx((0.9 + 0.2 + 0.6) / 3)
    # 15·0.9 + 10·0.8 + 15·0.6
    assert metrics.combined_points(truth, pred, conf) == pytest.approx(13.5 + 8.0 + 9.0)
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        metrics.weighted_confidence(truth, pred, [0.9, 1.2, 0.1])


def test_f1_and_auroc_follow_scikit_learn() -> None:
    truth, pred = [0, 1, 1, 0, 1], [0, 1, 0, 0, 1]
    assert metrics.f1(truth, pred) == pytest.approx(f1_score(truth, pred, average="macro"))
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3], [0.1, 0.9]])
    assert metrics.auroc(truth, probs) == pytest.approx(1.0)  # every positive scores above every negative
    four = np.eye(4)[[0, 1, 2, 3, 0, 1, 2, 3]] * 0.7 + 0.075
    assert metrics.auroc([0, 1, 2, 3, 0, 1, 2, 3], four) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="both positive and negative"):
        metrics.auroc([1, 1], probs[:2])


def test_dice() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True  # 8 pixels
    b[1:3] = True  # 8 pixels, 4 shared
    assert metrics.dice(a, b) == pytest.approx(0.5)
    assert metrics.dice(a, a) == 1.0 and metrics.dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.dice(a, b[:3])


def test_her2_aggregation_takes_the_dominant_tile_class() -> None:
    probs = np.array([[0.1, 0.1, 0.7, 0.1], [0.1, 0.1, 0.6, 0.2], [0.0, 0.0, 0.1, 0.9]])
    predicted, confidence, mean = metrics.aggregate_tile_probabilities(probs, "her2")
    # 2+ wins two votes to one even though 3+ has the single most confident tile
    assert predicted == 2
    assert confidence == pytest.approx((0.7 + 0.6 + 0.1) / 3)
    assert mean.sum() == pytest.approx(1.0)


def test_her2_aggregation_breaks_vote_ties_by_mean_probability() -> None:
    probs = np.array([[0.6, 0.4, 0, 0], [0.0, 0.0, 0.1, 0.9]])
    assert metrics.aggregate_tile_probabilities(probs, "her2")[0] == 3


def test_mmr_aggregation_is_the_mean_probability() -> None:
    probs = np.array([[0.9, 0.1], [0.45, 0.55], [0.4, 0.6]])
    predicted, confidence, _ = metrics.aggregate_tile_probabilities(probs, "mmr")
    assert predicted == 0 and confidence == pytest.approx(1.75 / 3)  # majority vote would say "loss"
    with pytest.raises(ValueError, match="n_tiles >= 1"):
        metrics.aggregate_tile_probabilities(np.zeros((0, 2)), "mmr")
    with pytest.raises(ValueError, match="unknown task"):
        metrics.aggregate_tile_probabilities(probs, "pdl1")


def test_combine_fold_probabilities_is_the_mean() -> None:
    predicted, confidence, mean = metrics.combine_fold_probabilities([[0.6, 0.4], [0.2, 0.8], [0.4, 0.6]])
    assert predicted == 1 and confidence == pytest.approx(0.6) and mean.tolist() == pytest.approx([0.4, 0.6])


def test_attention_diagnostics() -> None:
    from dual_attention.slides import Level0Box

    tissue = np.zeros((10, 10), bool)
    tissue[:, :8] = True  # 80 tissue pixels
    tumour = np.zeros((10, 10), bool)
    tumour[:, :2] = True  # 20 of them: share 0.25
    flat = np.where(tissue, 1 / 80, 0.0)
    assert metrics.attention_entropy_normalised(flat, tissue) == pytest.approx(1.0)
    assert metrics.attention_on_tumour_ratio(flat, tissue, tumour) == pytest.approx(1.0)
    on_tumour = np.where(tumour, 1 / 20, 0.0)
    assert metrics.attention_on_tumour_ratio(on_tumour, tissue, tumour) == pytest.approx(4.0)  # 1 / share
    assert metrics.attention_entropy_normalised(on_tumour, tissue) == pytest.approx(np.log(20) / np.log(80))
    assert np.isnan(metrics.attention_on_tumour_ratio(flat, tissue, np.zeros_like(tumour)))
    boxes = [Level0Box(0, 0, 64, 64), Level0Box(96, 0, 64, 64)]  # thumbnail cols 0-1 and 3-4 at 1/32
    assert metrics.tumour_fraction_of_boxes(boxes, tumour, 32) == [1.0, 0.0]


def test_glimpse_spread_is_zero_for_one_path_for_every_tile() -> None:
    one_path = np.tile(np.array([[0.1, 0.2], [0.5, -0.5], [0.9, 0.9]]), (6, 1, 1))
    one_path[:, 0] = np.random.default_rng(0).uniform(-1, 1, (6, 2))  # a random first glimpse alone
    assert metrics.glimpse_spread(one_path) == 0.0
    apart = one_path.copy()
    apart[:, 1:] += np.random.default_rng(1).uniform(-0.5, 0.5, (6, 2, 2))
    assert metrics.glimpse_spread(apart) > 0.1


def test_each_task_has_one_primary_metric_among_the_slide_metrics() -> None:
    her2 = metrics.slide_metrics("her2", [0, 1, 2, 3], [0, 1, 2, 2], np.eye(4), [0.9, 0.8, 0.7, 0.6])
    mmr = metrics.slide_metrics("mmr", [0, 1, 1], [0, 1, 0], np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]),
                                [0.9, 0.8, 0.6])
    assert metrics.primary_metric("her2") == "agreement_points_per_case"
    assert her2["agreement_points_per_case"] == pytest.approx((15 + 15 + 15 + 5) / 4)
    # MMR is ranked by macro F1, which every validation fold defines (AUROC needs both classes)
    assert metrics.primary_metric("mmr") == "f1_macro" and mmr["f1_macro"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="unknown task"):
        metrics.primary_metric("pdl1")
