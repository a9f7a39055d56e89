"""Speed to the floor (issue 12): the SAM's logits tile by tile equal the one-pass logits, scoring
through the tiled path picks the same tiles and class, and scoring reports a per-stage profile."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dual_attention.checkpoint import load_checkpoint, save_checkpoint
from dual_attention.config import preset
from dual_attention.models import DualAttentionModel, SoftAttentionNet, _running_max, images_to_tensor
from dual_attention.pipeline import SAM_TILE_PX, attention_map_of, propose_tiles, score_slide
from dual_attention.profiling import SCORING_STAGES, StageTimer, peak_rss_bytes


def _sam(preset_name: str, seed: int) -> SoftAttentionNet:
    """A preset's SAM with weights drawn from ``seed``; the head's weights scaled up so the logits vary
    across the map (the near-uniform start would make any comparison trivially easy)."""
    torch.manual_seed(seed)
    sam = DualAttentionModel(preset(preset_name)).soft_attention
    torch.nn.init.normal_(sam.to_logit.weight, std=0.5)
    return sam.eval()


@pytest.mark.parametrize("k", range(1, 10))
def test_running_max_equals_stride_one_max_pool(k: int) -> None:
    x = torch.randn(2, 3, 23, 17, generator=torch.Generator().manual_seed(k))
    expected = F.max_pool2d(x, k, stride=1)
    assert torch.equal(_running_max(_running_max(x, k, dim=2), k, dim=3), expected)


@pytest.mark.parametrize("preset_name", ["cpu-small", "paper-her2", "paper-mmr"])
@pytest.mark.parametrize(("height", "width", "tile_px"), [(37, 53, 16), (61, 29, 7), (40, 40, 40), (33, 70, 3)])
def test_tiled_logits_equal_one_pass_logits(preset_name: str, height: int, width: int, tile_px: int) -> None:
    sam = _sam(preset_name, seed=height * width)
    generator = torch.Generator().manual_seed(tile_px)
    thumbnail = torch.rand(2, 3, height, width, generator=generator)
    with torch.inference_mode():
        one_pass = sam.logits(thumbnail)
        tiled = sam.tiled_logits(thumbnail, tile_px)
    assert tiled.shape == one_pass.shape == (2, height, width)
    assert one_pass.std() > 0.02, "a map whose logits vary, or the comparison says nothing"
    torch.testing.assert_close(tiled, one_pass, rtol=1e-5, atol=1e-5)


def test_receptive_radius_is_exactly_enough() -> None:
    """A halo one pixel short of the radius changes some logits: the radius is not over-generous by
    accident of a test that would pass with any halo."""
    sam = _sam("paper-her2", seed=1)
    assert sam.receptive_radius == 4 + 8 // 2
    thumbnail = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        one_pass = sam.logits(thumbnail)
        radius = sam.receptive_radius
        sam.conv_layers -= 1  # shrinks the halo by one
        try:
            short = sam.tiled_logits(thumbnail, 16)
        finally:
            sam.conv_layers += 1
        assert sam.receptive_radius == radius
    assert (short - one_pass).abs().max() > 1e-4


@pytest.mark.parametrize("preset_name", ["cpu-small", "paper-her2", "paper-mmr"])
def test_attention_map_tiled_equals_one_pass(preset_name: str) -> None:
    torch.manual_seed(3)
    model = DualAttentionModel(preset(preset_name)).eval()
    torch.nn.init.normal_(model.soft_attention.to_logit.weight, std=0.5)
    rng = np.random.default_rng(4)
    thumbnail = rng.integers(0, 256, size=(45, 67, 3), dtype=np.uint8)
    mask = np.zeros((45, 67), bool)
    mask[5:40, 9:60] = True
    with torch.inference_mode():
        tiled = attention_map_of(model, thumbnail, mask, tile_px=11)
        one_pass = attention_map_of(model, thumbnail, mask, tile_px=None)
    torch.testing.assert_close(tiled, one_pass, rtol=1e-5, atol=1e-9)
    assert torch.all(tiled[~torch.as_tensor(mask)] == 0)
    assert float(tiled.sum()) == pytest.approx(1.0, abs=1e-5)


def test_training_keeps_the_one_pass_path_with_gradients() -> None:
    model = DualAttentionModel(preset("cpu-small"))
    thumbnail = np.random.default_rng(5).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    attention = attention_map_of(model, thumbnail, None, tile_px=4)  # grad enabled: tile_px is ignored
    attention.max().backward()
    assert model.soft_attention.to_logit.weight.grad is not None
    assert torch.allclose(attention.detach(), model.soft_attention(images_to_tensor(thumbnail))[0].detach())


def _slide(seed: int, width: int, height: int, downsample: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A level-0 image with a textured tissue rectangle, its thumbnail and its tissue mask."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 235, np.uint8)
    tissue_rows, tissue_cols = slice(height // 8, height * 7 // 8), slice(width // 8, width * 7 // 8)
    image[tissue_rows, tissue_cols] = rng.integers(50, 210, size=image[tissue_rows, tissue_cols].shape, dtype=np.uint8)
    thumbnail = image.reshape(height // downsample, downsample, width // downsample, downsample, 3).mean(
        (1, 3)).astype(np.uint8)
    mask = np.zeros(thumbnail.shape[:2], bool)
    mask[tissue_rows.start // downsample:tissue_rows.stop // downsample,
         tissue_cols.start // downsample:tissue_cols.stop // downsample] = True
    return image, thumbnail, mask


@pytest.mark.parametrize("task", ["her2", "mmr"])
def test_score_is_unchanged_by_the_tiled_sam(tmp_path: Path, task: str) -> None:
    """The same checkpoint (fixed seed), slide and seed score the same tiles and class through the tiled
    SAM (small tiles, and the default side) as through the one-pass SAM."""
    config = preset("cpu-small", task=task)
    torch.manual_seed(11)
    model = DualAttentionModel(config)
    torch.nn.init.normal_(model.soft_attention.to_logit.weight, std=0.5)
    model, config, _ = load_checkpoint(save_checkpoint(tmp_path / "checkpoint", model, config))
    downsample = config.slide.thumbnail_downsample
    image, thumbnail, mask = _slide(7, width=96 * downsample, height=64 * downsample, downsample=downsample)
    dims = (image.shape[1], image.shape[0])

    def read_tiles(boxes) -> np.ndarray:
        return np.stack([image[b.y0:b.y0 + b.height, b.x0:b.x0 + b.width] for b in boxes])

    reference = score_slide(model, thumbnail, mask, dims, read_tiles, config, seed=5, sam_tile_px=None)
    for tile_px in (13, 32, SAM_TILE_PX):
        tiled = score_slide(model, thumbnail, mask, dims, read_tiles, config, seed=5, sam_tile_px=tile_px)
        assert [t.level0_box for t in tiled.tiles] == [t.level0_box for t in reference.tiles]
        assert tiled.predicted_class == reference.predicted_class
        assert tiled.class_probabilities == reference.class_probabilities
        np.testing.assert_allclose(tiled.attention_map, reference.attention_map, rtol=1e-5, atol=1e-10)
    proposal = propose_tiles(model, thumbnail, mask, dims, config, seed=5, sam_tile_px=13)
    assert proposal.level0_boxes == [t.level0_box for t in reference.tiles]


def test_score_slide_records_the_pipeline_stages() -> None:
    config = preset("cpu-small")
    torch.manual_seed(0)
    model = DualAttentionModel(config).eval()
    image, thumbnail, mask = _slide(1, width=48 * 32, height=32 * 32, downsample=32)
    timer = StageTimer()
    score_slide(model, thumbnail, mask, (image.shape[1], image.shape[0]),
                lambda boxes: np.stack([image[b.y0:b.y0 + b.height, b.x0:b.x0 + b.width] for b in boxes]),
                config, seed=0, timer=timer)
    profile = timer.as_dict()
    assert list(profile["stages_ms"]) == ["soft_attention", "sampling", "tile_reads", "agent", "aggregation"]
    assert all(ms >= 0 for ms in profile["stages_ms"].values()) and profile["stages_ms"]["agent"] > 0
    assert profile["total_ms"] == pytest.approx(sum(profile["stages_ms"].values()), abs=0.01)
    assert profile["peak_rss_bytes"] == peak_rss_bytes() > 50 * 2**20  # python + torch alone exceed 50 MiB


def test_stage_timer_accumulates_repeated_stages() -> None:
    timer = StageTimer()
    for _ in range(3):
        with timer.stage("tile_reads"):
            sum(range(10_000))
    with pytest.raises(RuntimeError), timer.stage("agent"):
        raise RuntimeError("a failing stage still records its time")
    assert set(timer.ms) == {"tile_reads", "agent"} and timer.ms["tile_reads"] > 0


_THREADS_ALLOCATE = """
import ctypes, sys, threading
import numpy as np
from dual_attention.profiling import one_malloc_arena
if sys.argv[1] == "one":
    assert one_malloc_arena()
def allocate():  # 8-KB arrays: malloc'd from the thread's arena (below the mmap threshold)
    kept = [np.ones(1000) for _ in range(200)]
    del kept
threads = [threading.Thread(target=allocate) for _ in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
ctypes.CDLL("libc.so.6").malloc_stats()  # to stderr: one "Arena N:" block per arena
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="glibc's malloc arenas: Linux only")
def test_one_malloc_arena_keeps_every_thread_in_one_heap() -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    arenas = {}
    for mode in ("default", "one"):
        done = subprocess.run([sys.executable, "-c", _THREADS_ALLOCATE, mode], capture_output=True, text=True,
                              cwd=root, check=True)
        arenas[mode] = done.stderr.count("Arena ")
    assert arenas["default"] > 1  # glibc's default: threads that allocate get arenas of their own
    assert arenas["one"] == 1


def test_score_job_json_has_the_profile(tmp_path: Path, shared_slides: Path) -> None:
    from jobs.score import main

    config = preset("cpu-small")
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "checkpoint", DualAttentionModel(config), config)
    out = tmp_path / "score.json"
    slide = shared_slides / "aperio" / "CMU-1-Small-Region.svs"
    assert main(["--model", str(checkpoint.parent), "--slide", str(slide), "--out", str(out)]) == 0
    profile = json.loads(out.read_text())["profile"]
    assert list(profile["stages_ms"]) == list(SCORING_STAGES)
    assert profile["stages_ms"]["thumbnail"] > 0 and profile["stages_ms"]["agent"] > 0
    assert profile["peak_rss_bytes"] > 50 * 2**20


@pytest.mark.parametrize(("channels_last", "running_max"), [(False, True), (True, False), (False, False)])
def test_tiled_logits_equal_one_pass_with_each_speed_up_switched_off(
    monkeypatch: pytest.MonkeyPatch, channels_last: bool, running_max: bool
) -> None:
    """The benchmark's switches (bench_slide_cost.py measures each speed-up) keep the same values."""
    monkeypatch.setattr(SoftAttentionNet, "inference_channels_last", channels_last)
    monkeypatch.setattr(SoftAttentionNet, "inference_running_max", running_max)
    sam = _sam("paper-her2", seed=9)
    thumbnail = torch.rand(1, 3, 41, 58, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        torch.testing.assert_close(sam.tiled_logits(thumbnail, 20), sam.logits(thumbnail), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_tiles_side_by_side_equal_one_pass_and_leave_the_thread_count(threads: int) -> None:
    """With several torch threads the tiles run side by side, one thread each (``tiled_logits``): same
    logits as one pass, in inference mode too, and the caller's thread count is restored."""
    config = preset("paper-her2")
    torch.manual_seed(3)
    sam = DualAttentionModel(config).soft_attention.eval()
    thumbnail = torch.rand(1, 3, 150, 230)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            reference = sam.logits(thumbnail)
        with torch.inference_mode():
            tiled = sam.tiled_logits(thumbnail, 32)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(tiled, reference, rtol=1e-5, atol=1e-5)
