"""Evaluation job: a tiny untrained checkpoint on a tiny synthetic manifest with one broken slide."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from eval_cohort import write_tiny_her2_cohort

from dual_attention.checkpoint import save_checkpoint
from dual_attention.config import preset
from dual_attention.manifest import ManifestError
from dual_attention.models import DualAttentionModel
from jobs.evaluate import compute_metrics, main, select_rows

# The HER2 contest table, typed here independently of dual_attention.metrics for the hand check.
CONTEST_POINTS = {(0, 0): 15, (0, 1): 15, (0, 2): 10, (0, 3): 0, (1, 0): 15, (1, 1): 15, (1, 2): 10, (1, 3): 0,
                  (2, 0): 5, (2, 1): 5, (2, 2): 15, (2, 3): 10, (3, 0): 0, (3, 1): 0, (3, 2): 5, (3, 3): 15}


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory, shared_slides: Path) -> Path:
    """Four 1024² synthetic HER2 slides (one per class) and the unreadable Aperio file."""
    return write_tiny_her2_cohort(tmp_path_factory.mktemp("cohort"), shared_slides / "broken" / "unreadable.svs")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = preset("cpu-small").with_overrides({"sampler.n_tiles": 2, "sampler.n_candidates": 4})
    model = DualAttentionModel(config)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt"), model, config)


def _hand_auroc_ovr(labels: np.ndarray, probs: np.ndarray) -> float:
    """Macro one-vs-rest AUROC by counting pairs (positive ranked above negative; ties count half)."""
    aucs = []
    for c in range(probs.shape[1]):
        positives, negatives = probs[labels == c, c], probs[labels != c, c]
        pairs = [(p > n) + 0.5 * (p == n) for p in positives for n in negatives]
        aucs.append(np.mean(pairs))
    return float(np.mean(aucs))


def test_evaluate_skips_the_broken_slide_and_metrics_match_a_hand_check(
    ray_cluster: None, tiny_cohort: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "eval"
    code = main(["--model", str(tiny_checkpoint.parent), "--manifest", str(tiny_cohort), "--out", str(out),
                 "--overlays", "2", "--quiet"])
    assert code == 0
    captured = capsys.readouterr()
    assert "skipped broken" in captured.err and "unreadable.svs" in captured.err

    predictions = pq.read_table(out / "predictions.parquet").to_pylist()
    assert sorted(p["slide_id"] for p in predictions) == ["s0", "s1", "s2", "s3"]
    skipped = pq.read_table(out / "skipped.parquet").to_pylist()
    assert [s["slide_id"] for s in skipped] == ["broken"]
    assert skipped[0]["error"] == "SlideError" and "unreadable.svs" in skipped[0]["reason"]

    for p in predictions:
        # cpu-small tiles are 256² on a 1024² slide; 2 tiles at most
        assert 1 <= p["n_tiles"] <= 2
        assert p["level0_pixels_read"] == p["n_tiles"] * 256 * 256
        assert p["fraction_level0_read"] == pytest.approx(p["level0_pixels_read"] / 1024**2)
        assert p["wall_time_s"] >= p["score_s"] > 0
        assert sum(p[f"prob_{n}"] for n in ("0", "1+", "2+", "3+")) == pytest.approx(1.0, abs=1e-5)
    tiles = pq.read_table(out / "tiles.parquet").to_pylist()
    glimpses = pq.read_table(out / "glimpses.parquet").to_pylist()
    assert len(tiles) == sum(p["n_tiles"] for p in predictions)
    n_glimpses = preset("cpu-small").agent.n_glimpses
    assert len(glimpses) == n_glimpses * len(tiles)
    for g in glimpses:  # glimpse centres lie inside their tile
        tile = next(t for t in tiles if t["slide_id"] == g["slide_id"] and t["tile_index"] == g["tile_index"])
        assert tile["x0"] <= g["x_level0_px"] <= tile["x0"] + tile["width"]
        assert tile["y0"] <= g["y_level0_px"] <= tile["y0"] + tile["height"]
    assert len(list((out / "overlays").glob("*.png"))) == 2

    # hand check of the metrics from the predictions table
    metrics = json.loads((out / "metrics.json").read_text())
    labels = np.array([p["label"] for p in predictions])
    predicted = np.array([p["predicted_class"] for p in predictions])
    confidence = np.array([p["confidence"] for p in predictions])
    probs = np.array([[p[f"prob_{n}"] for n in ("0", "1+", "2+", "3+")] for p in predictions])
    assert metrics["n_slides"] == 4 and metrics["n_skipped"] == 1
    assert metrics["accuracy"] == pytest.approx(np.mean(labels == predicted))
    points = [CONTEST_POINTS[(t, q)] for t, q in zip(labels, predicted, strict=True)]
    assert metrics["agreement_points"] == sum(points)
    assert metrics["combined_points"] == pytest.approx(sum(pt * c for pt, c in zip(points, confidence, strict=True)))
    assert metrics["weighted_confidence"] == pytest.approx(np.mean(np.where(labels == predicted, confidence,
                                                                             1 - confidence)))
    # macro F1 over the classes that occur in labels or predictions (scikit-learn's convention)
    f1s = []
    for c in sorted(set(labels) | set(predicted)):
        tp = np.sum((predicted == c) & (labels == c))
        fp, fn = np.sum((predicted == c) & (labels != c)), np.sum((predicted != c) & (labels == c))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    assert metrics["f1_macro"] == pytest.approx(np.mean(f1s))
    assert metrics["auroc"] == pytest.approx(_hand_auroc_ovr(labels, probs / probs.sum(axis=1, keepdims=True)))
    assert metrics["fraction_level0_read"] == pytest.approx(np.mean([p["fraction_level0_read"] for p in predictions]))


def test_compute_metrics_by_hand_on_fixed_predictions() -> None:
    labels = [0, 1, 2, 3, 3, 2]
    predicted = [0, 2, 2, 3, 1, 2]
    confidence = [0.9, 0.6, 0.8, 0.7, 0.5, 1.0]
    probs = np.full((6, 4), 0.1)
    for i, p in enumerate(predicted):
        probs[i, p] = 0.7
    metrics = compute_metrics(labels, predicted, probs, confidence, "her2")
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    # points: 15 + 10 + 15 + 15 + 0 + 15 = 70
    assert metrics["agreement_points"] == 70 and metrics["agreement_points_max"] == 90
    assert metrics["combined_points"] == pytest.approx(15 * 0.9 + 10 * 0.6 + 15 * 0.8 + 15 * 0.7 + 0 + 15 * 1.0)
    assert metrics["weighted_confidence"] == pytest.approx((0.9 + 0.4 + 0.8 + 0.7 + 0.5 + 1.0) / 6)
    # F1 per class: 0 -> 1, 1 -> 0, 2 -> 2*2/(2*2+1+0)=0.8, 3 -> 2*1/(2*1+0+1)=2/3
    assert metrics["f1_macro"] == pytest.approx((1 + 0 + 0.8 + 2 / 3) / 4)
    single = compute_metrics([1, 1], [1, 0], np.array([[0.2, 0.8], [0.6, 0.4]]), [0.8, 0.6], "mmr")
    assert single["auroc"] is None and "both" in single["auroc_note"]
    assert "agreement_points" not in single
    # a class absent from the labels leaves one-vs-rest AUROC undefined: None, with the reason
    absent = compute_metrics([0, 1, 1], [0, 1, 2], np.eye(4)[[0, 1, 2]] * 0.7 + 0.075, [0.7] * 3, "her2")
    assert absent["auroc"] is None and "absent" in absent["auroc_note"]


def _local_read_tiles(path: str, tile_px: int):  # noqa: ANN202 - the training worker's in-process reader
    from dual_attention.slides import SlideError
    from jobs.runtime.tile_plane import TileReader, TileRequest

    reader = TileReader()

    def read(boxes):  # noqa: ANN001, ANN202
        results = reader.read_batch([TileRequest(path, box) for box in boxes])
        for result in results:
            if isinstance(result, SlideError):
                raise result
        return np.stack(results) if results else np.zeros((0, tile_px, tile_px, 3), np.uint8)

    return read


def test_training_validation_and_evaluation_agree_on_the_same_slides_and_model(
    ray_cluster: None, tiny_cohort: Path, tiny_checkpoint: Path
) -> None:
    """The figures a training run validates with are the ones evaluation reports: the same per-slide seed,
    the same predictions and one metrics function (keys included), on the same slides and model."""
    from dual_attention.checkpoint import load_checkpoint
    from dual_attention.slides import SlideError
    from dual_attention.training import (
        EpochLoop,
        EpochShare,
        SlideExample,
        build_optimizer,
        epoch_metrics,
        prediction_row,
        validation_metrics,
    )
    from jobs.evaluate import evaluate_rows
    from jobs.preprocess import load_or_compute_thumbnail

    model, config, _ = load_checkpoint(tiny_checkpoint.parent)
    rows = select_rows(tiny_cohort, task=config.task)
    tile_px = config.tile.tile_level0_px
    examples = []
    for row in rows:  # as the training job prepares its slides (jobs.preprocess), the broken one left out
        try:
            thumbnail, tissue, dims = load_or_compute_thumbnail(row["path"], config, None)
        except SlideError:
            continue
        examples.append(SlideExample(row["slide_id"], int(row["label"]), thumbnail, tissue, dims,
                                     _local_read_tiles(row["path"], tile_px)))
    seed = config.train.seed
    optimizer, scheduler = build_optimizer(model, config)
    loop = EpochLoop(model, config, optimizer, scheduler, [], examples)  # the worker's validation, rank 0 of 1
    trained_rows = [prediction_row(v, config) for v in loop.validate()]
    share = EpochShare(terms={}, val_rows=trained_rows, train_seconds=0.0, train_tile_wait_s=0.0, read_s=0.0,
                       level0_pixels=0, epoch_seconds=0.0, bad_slides={}, steps=0)
    reported = epoch_metrics(config, 0, [share], optimizer)  # what the epoch's report and MLflow get

    report = evaluate_rows(model, config, rows, seed=seed, progress=False)  # the cohort job's pipeline
    assert [s["slide_id"] for s in report.skipped] == ["broken"]
    by_id = {p["slide_id"]: p for p in report.predictions}
    assert sorted(by_id) == sorted(r["slide_id"] for r in trained_rows) == ["s0", "s1", "s2", "s3"]
    for row in trained_rows:
        evaluated = by_id[row["slide_id"]]
        assert evaluated["predicted_class"] == row["predicted"]
        assert [evaluated[f"prob_{name}"] for name in config.class_names] == pytest.approx(row["probabilities"])
    evaluated_metrics = {k: v for k, v in report.metrics.items() if k != "contest_source"}
    training_metrics = validation_metrics(config.task, trained_rows)
    assert evaluated_metrics.keys() == training_metrics.keys()
    assert "agreement_points_per_case" in training_metrics
    for key, value in evaluated_metrics.items():
        same = value if value is None or isinstance(value, str) else pytest.approx(value)
        assert training_metrics[key] == same and reported[f"val_{key}"] == same, key


def test_select_rows_filters_folds_and_refuses_another_task(tiny_cohort: Path, tmp_path: Path) -> None:
    rows = select_rows(tiny_cohort, folds=[1], task="her2")
    assert sorted(r["slide_id"] for r in rows) == ["s1", "s3"]
    assert all(Path(r["path"]).is_absolute() for r in rows)
    with pytest.raises(ManifestError, match="another task"):
        select_rows(tiny_cohort, task="mmr")
    assert main(["--model", str(tmp_path / "nothing"), "--manifest", str(tiny_cohort), "--out",
                 str(tmp_path / "o")]) == 2
