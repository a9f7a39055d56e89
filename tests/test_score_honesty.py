"""Answers tell the whole truth: the CLI's score JSON says where the slide's scale came from, and a slide
smaller than one tile is refused naming the minimum (its ``fraction_level0_read`` could only exceed 1)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from dual_attention.checkpoint import save_checkpoint
from dual_attention.config import preset
from dual_attention.models import DualAttentionModel
from dual_attention.pipeline import ScoringError, score_slide
from dual_attention.slides import open_slide
from dual_attention.synthetic import write_synthetic_slide
from jobs import score


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = preset("cpu-small")
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model") / "checkpoint"
    save_checkpoint(folder, DualAttentionModel(config).eval(), config)
    return folder


def _tissue_like_tiff(path: Path, width_px: int, height_px: int) -> Path:
    """A tiled TIFF with a pink blob on white and no resolution tags: OpenSlide reports no mpp and no
    objective power, so the scale must be assumed."""
    rows, cols = np.mgrid[0:height_px, 0:width_px]
    inside = ((rows - height_px / 2) / (height_px / 3)) ** 2 + ((cols - width_px / 2) / (width_px / 3)) ** 2 < 1
    image = np.full((height_px, width_px, 3), 255, np.uint8)
    noise = np.random.default_rng(0).integers(0, 40, size=(height_px, width_px, 1), dtype=np.uint8)
    image[inside] = (np.array([200, 120, 160], np.uint8) - noise[inside])
    tifffile.imwrite(path, image, tile=(64, 64), photometric="rgb", compression="zlib")
    return path


def test_cli_score_says_the_scale_was_assumed(checkpoint: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    slide = _tissue_like_tiff(tmp_path / "no-mpp.tiff", 1024, 768)
    assert score.main(["--model", str(checkpoint), "--slide", str(slide)]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["calibration"]["mpp_source"] == "default (assumed 40x)"
    assert answer["calibration"]["objective_source"] == "default"
    assert answer["calibration"]["objective_power"] == 40.0 and answer["level0_dimensions"] == [1024, 768]
    assert 0 < answer["fraction_level0_read"] <= 1

    recorded = tmp_path / "recorded.tiff"  # mpp 0.25 and AppMag 40 in the file
    write_synthetic_slide(recorded, "her2", label=1, seed=4, width_level0_px=1024, height_level0_px=1024)
    assert score.main(["--model", str(checkpoint), "--slide", str(recorded)]) == 0
    calibration = json.loads(capsys.readouterr().out)["calibration"]
    info = open_slide(recorded).info
    assert calibration == {"mpp_x_um_per_px": info.mpp_x, "mpp_y_um_per_px": info.mpp_y, "mpp_source": "file",
                           "objective_power": info.objective_power, "objective_source": "file"}


def test_a_slide_smaller_than_one_tile_is_refused_naming_the_minimum(checkpoint: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    slide = _tissue_like_tiff(tmp_path / "tiny.tiff", 200, 160)
    assert score.main(["--model", str(checkpoint), "--slide", str(slide)]) == 1
    assert "200x160" in (err := capsys.readouterr().err) and "minimum size is 256x256" in err

    # the core pipeline refuses it too, whoever calls it: no box may reach past the slide's edges
    config = preset("cpu-small")
    model = DualAttentionModel(config).eval()
    with open_slide(slide) as opened:
        thumbnail = opened.thumbnail(32)
        mask = np.ones(thumbnail.shape[:2], bool)
        with pytest.raises(ScoringError, match="minimum size is 256x256"):
            score_slide(model, thumbnail, mask, opened.dimensions,
                        lambda boxes: np.stack([opened.read_box(b) for b in boxes]), config, seed=0)
