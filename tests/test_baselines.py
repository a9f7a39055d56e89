"""Baselines: random sampling (Gumbel over tissue, same agent) and the sliding window, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from eval_cohort import write_tiny_her2_cohort

from dual_attention.checkpoint import save_checkpoint
from dual_attention.config import preset
from dual_attention.models import DualAttentionModel
from dual_attention.pipeline import propose_tiles
from dual_attention.sampling import random_locations
from dual_attention.slides import thumb_to_level0_box
from jobs.baselines import load_sliding_window_model, main


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory, shared_slides: Path) -> Path:
    return write_tiny_her2_cohort(tmp_path_factory.mktemp("cohort"), shared_slides / "broken" / "unreadable.svs")


def _tissue_thumbnail() -> tuple[np.ndarray, np.ndarray]:
    """A 40x48 thumbnail whose tissue is an irregular set: a disc and a thin bar (57 + 30 pixels)."""
    rows, cols = np.mgrid[0:40, 0:48]
    tissue = (rows - 12) ** 2 + (cols - 14) ** 2 <= 18
    tissue |= (rows >= 30) & (rows < 33) & (cols >= 20) & (cols < 30)
    thumbnail = np.repeat(np.where(tissue, 120, 240).astype(np.uint8)[..., None], 3, axis=2)
    return thumbnail, tissue


def test_random_sampler_takes_tissue_tiles_without_replacement_and_seeded() -> None:
    thumbnail, tissue = _tissue_thumbnail()
    n_tissue = int(tissue.sum())
    config = preset("cpu-small").with_overrides({"sampler.n_tiles": n_tissue, "sampler.n_candidates": n_tissue})
    model = DualAttentionModel(config).eval()
    dims = (48 * 32, 40 * 32)
    proposal = propose_tiles(model, thumbnail, tissue, dims, config, seed=3, sampler="random")
    centres = [tuple(c) for c in proposal.centers_thumb_rc.tolist()]
    # every tissue pixel exactly once: inside tissue, and without replacement
    assert len(centres) == len(set(centres)) == n_tissue
    assert set(centres) == {tuple(rc) for rc in np.argwhere(tissue).tolist()}
    assert proposal.shortfall_reason is None
    assert proposal.level0_boxes[0] == thumb_to_level0_box(centres[0], 32, 256, dims)

    few = config.with_overrides({"sampler.n_tiles": 5, "sampler.n_candidates": 5})
    first = propose_tiles(model, thumbnail, tissue, dims, few, seed=7, sampler="random")
    again = propose_tiles(model, thumbnail, tissue, dims, few, seed=7, sampler="random")
    other = propose_tiles(model, thumbnail, tissue, dims, few, seed=8, sampler="random")
    assert first.level0_boxes == again.level0_boxes
    assert first.level0_boxes != other.level0_boxes
    assert all(tissue[r, c] for r, c in first.centers_thumb_rc)
    # asking for more tiles than tissue pixels: all of them, and the shortfall is explained
    many = config.with_overrides({"sampler.n_tiles": n_tissue + 10, "sampler.n_candidates": n_tissue + 10})
    short = propose_tiles(model, thumbnail, tissue, dims, many, seed=1, sampler="random")
    assert len(short.level0_boxes) == n_tissue and "tissue" in short.shortfall_reason


def test_random_sampler_is_uniform_over_tissue() -> None:
    """One location per draw over 2000 seeds (the sampler alone, no SAM): the disc and the bar are hit
    in proportion to their areas, and nothing outside tissue."""
    _, tissue = _tissue_thumbnail()
    bar = np.zeros_like(tissue)
    bar[30:33, 20:30] = True
    hits = np.array([random_locations(tissue, 1, np.random.default_rng(s)).centers_thumb_rc[0] for s in range(2000)])
    assert tissue[hits[:, 0], hits[:, 1]].all()
    bar_share = bar[hits[:, 0], hits[:, 1]].mean()
    expected = bar.sum() / tissue.sum()  # 30 / 87 = 0.345; binomial sd over 2000 draws is 0.011
    assert abs(bar_share - expected) < 0.04


def test_random_baseline_job_runs_the_agent_on_random_tiles(ray_cluster: None, tiny_cohort: Path,
                                                            tmp_path: Path) -> None:
    config = preset("cpu-small").with_overrides({"sampler.n_tiles": 2, "sampler.n_candidates": 4})
    checkpoint = save_checkpoint(tmp_path / "ckpt", DualAttentionModel(config), config)
    out = tmp_path / "random"
    assert main(["random", "--model", str(checkpoint), "--manifest", str(tiny_cohort), "--out", str(out),
                 "--overlays", "0", "--quiet"]) == 0
    predictions = pq.read_table(out / "predictions.parquet").to_pylist()
    assert sorted(p["slide_id"] for p in predictions) == ["s0", "s1", "s2", "s3"]
    assert {p["method"] for p in predictions} == {"random-sampling"}
    assert [s["slide_id"] for s in pq.read_table(out / "skipped.parquet").to_pylist()] == ["broken"]
    assert all(p["level0_pixels_read"] == p["n_tiles"] * 256**2 for p in predictions)


def test_sliding_window_job_trains_on_train_folds_and_scores_test_folds(ray_cluster: None, tiny_cohort: Path,
                                                                         tmp_path: Path) -> None:
    out = tmp_path / "window"
    # 32² patches at 10x from a 40x slide: 128 level-0 px each; a tiny ResNet18 for one epoch
    args = ["sliding-window", "--manifest", str(tiny_cohort), "--out", str(out), "--train-folds", "1",
            "--test-folds", "0", "--patch-px", "32", "--magnification", "10", "--resnet-width", "8", "--epochs", "1",
            "--train-patches-per-slide", "8", "--stain-mask", "none", "--top-k", "3", "--torch-threads", "1",
            "--quiet"]
    assert main(args) == 0
    predictions = pq.read_table(out / "predictions.parquet").to_pylist()
    assert sorted(p["slide_id"] for p in predictions) == ["s0", "s2"]  # fold 0 only; the broken one skipped
    skipped = pq.read_table(out / "skipped.parquet").to_pylist()
    assert [s["slide_id"] for s in skipped] == ["broken"] and skipped[0]["error"] == "SlideError"
    for p in predictions:
        assert p["method"] == "sliding-window" and p["n_tiles"] >= 3
        assert p["level0_pixels_read"] == p["n_tiles"] * 128**2  # every selected patch read exactly once
        assert 0 < p["fraction_level0_read"] <= 1
        assert p["wall_time_s"] >= p["score_s"] > 0
    tiles = pq.read_table(out / "tiles.parquet").to_pylist()
    assert len(tiles) == 3 * len(predictions) and all(t["width"] == 128 for t in tiles)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_slides"] == 2 and metrics["accuracy"] == pytest.approx(
        np.mean([p["correct"] for p in predictions]))

    # the saved ResNet18 re-scores the same slides to the same probabilities
    model, config, task = load_sliding_window_model(out / "sliding_window_resnet18.pt")
    assert task == "her2" and config.patch_px == 32 and config.top_k == 3
    again = tmp_path / "again"
    assert main(["sliding-window", "--manifest", str(tiny_cohort), "--out", str(again), "--test-folds", "0",
                 "--model-path", str(out / "sliding_window_resnet18.pt"), "--quiet"]) == 0
    repeated = pq.read_table(again / "predictions.parquet").to_pylist()
    for a, b in zip(predictions, repeated, strict=True):
        assert a["slide_id"] == b["slide_id"]
        assert [a[f"prob_{n}"] for n in ("0", "1+", "2+", "3+")] == pytest.approx(
            [b[f"prob_{n}"] for n in ("0", "1+", "2+", "3+")], abs=1e-6)
