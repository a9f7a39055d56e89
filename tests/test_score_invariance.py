"""A slide's score does not change when its cost does (issue 12): with the same checkpoint, slide and seed,
every speed change of the scoring path gives the same tiles, glimpses, class and probabilities as the path
before it, run side by side here. (The tiled SAM has its own pins in test_sam_tiling.py.)

The paths before: OpenSlide reads every region (no TIFF-tile reader), tiles read one after another, tiles
converted to tensors in three passes, the agent pools each tile for its 20x glimpses at every step, and it
takes every tile of the slide in one batch (now: a memory budget's worth at a time).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dual_attention import models, pipeline, slides
from dual_attention.checkpoint import load_checkpoint, save_checkpoint
from dual_attention.config import preset
from dual_attention.models import DualAttentionModel, GlimpseSensor
from dual_attention.synthetic import write_synthetic_slide
from jobs.score import score_slide_path


def _legacy_images_to_tensor(images_uint8: np.ndarray) -> torch.Tensor:
    tensor = torch.as_tensor(np.array(images_uint8))
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(0)
    return tensor.permute(0, 3, 1, 2).float().div(255.0).contiguous()


def _use_the_paths_before(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slides.Slide, "_read_tiff_tiles", lambda self, location, level, size: None)
    monkeypatch.setattr(slides, "READ_THREADS", 1)
    monkeypatch.setattr(slides.Slide.read_boxes, "__defaults__", (None, 1))
    monkeypatch.setattr(pipeline, "images_to_tensor", _legacy_images_to_tensor)
    monkeypatch.setattr(pipeline, "AGENT_CHUNK_BYTES", {"cpu": 1 << 40, "cuda": 1 << 40})
    per_step = GlimpseSensor.forward
    monkeypatch.setattr(GlimpseSensor, "forward",
                        lambda self, tiles, location, sources=None: per_step(self, tiles, location, None))


def _fixed_checkpoint(tmp_path: Path, preset_name: str, task: str) -> tuple[DualAttentionModel, object]:
    config = preset(preset_name, task=task)
    torch.manual_seed(23)
    model = DualAttentionModel(config)
    torch.nn.init.normal_(model.soft_attention.to_logit.weight, std=0.5)  # an attention map with peaks
    model, config, _ = load_checkpoint(save_checkpoint(tmp_path / "checkpoint", model, config))
    return model.eval(), config


def _as_record(score: pipeline.SlideScore) -> dict:
    return {"boxes": [t.level0_box for t in score.tiles], "class": score.predicted_class,
            "tile_classes": [t.predicted_class for t in score.tiles],
            "trails": [t.glimpse_trail_level0 for t in score.tiles],
            "probabilities": np.array(score.class_probabilities),
            "tile_probabilities": np.array([t.class_probabilities for t in score.tiles])}


@pytest.mark.parametrize(("preset_name", "task", "size"), [("cpu-small", "her2", (6144, 4096)),
                                                            ("paper-her2", "her2", (8192, 6144)),
                                                            ("cpu-small", "mmr", (4096, 4096))])
def test_score_is_the_same_through_the_faster_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   preset_name: str, task: str, size: tuple[int, int]) -> None:
    model, config = _fixed_checkpoint(tmp_path, preset_name, task)
    slide_path = tmp_path / "slide.tiff"
    write_synthetic_slide(slide_path, task, 1, seed=31, width_level0_px=size[0], height_level0_px=size[1])
    with slides.open_slide(slide_path) as slide:
        assert slide._tiff_tiles is not None  # the fast reader is on this slide's path
    now, _, _ = score_slide_path(model, config, slide_path, seed=4)
    with monkeypatch.context() as patched:
        _use_the_paths_before(patched)
        with slides.open_slide(slide_path) as slide:
            assert slide._read_tiff_tiles((0, 0), 0, (8, 8)) is None
        before, _, _ = score_slide_path(model, config, slide_path, seed=4)
    now_record, before_record = _as_record(now), _as_record(before)
    assert now_record["boxes"] == before_record["boxes"]
    assert now_record["trails"] == before_record["trails"]
    assert now_record["class"] == before_record["class"]
    assert now_record["tile_classes"] == before_record["tile_classes"]
    np.testing.assert_array_equal(now_record["probabilities"], before_record["probabilities"])
    np.testing.assert_array_equal(now_record["tile_probabilities"], before_record["tile_probabilities"])
    assert len(now.tiles) >= 2  # several tiles, each with its glimpse trail, were compared
    # the budget splits the paper-size tiles into batches of one; all of them made one batch before
    tile_px = config.tile.tile_level0_px
    assert pipeline.agent_chunk_tiles(tile_px, torch.device("cpu")) < len(now.tiles) or tile_px < 2048


def test_the_paths_before_are_really_different_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison above is not vacuous: the patched functions are other code than the current ones."""
    current = (slides.Slide._read_tiff_tiles, pipeline.images_to_tensor, GlimpseSensor.forward)
    with monkeypatch.context() as patched:
        _use_the_paths_before(patched)
        assert (slides.Slide._read_tiff_tiles, pipeline.images_to_tensor, GlimpseSensor.forward) != current
    assert models.images_to_tensor is pipeline.images_to_tensor
