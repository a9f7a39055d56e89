"""Sliding-window baseline: DAB mask, patch selection, ResNet18, training step, top-k aggregation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dual_attention.slides import Level0Box
from dual_attention.sliding_window import (
    ResNet18,
    SlidingWindowConfig,
    dab_channel,
    dab_mask,
    patch_grid,
    predict_patches,
    score_slide_sliding_window,
    select_patches,
    top_k_aggregate,
    train_patch_classifier,
)

WHITE, HAEMATOXYLIN, DAB_BROWN, FAINT_BROWN = (242, 242, 242), (90, 90, 190), (150, 100, 50), (210, 180, 150)


def _image_with_regions() -> tuple[np.ndarray, np.ndarray]:
    """White glass, a blue (haematoxylin) block, and two brown (DAB) blocks: one strong, one faint."""
    image = np.full((60, 80, 3), WHITE, dtype=np.uint8)
    image[5:55, 5:75] = HAEMATOXYLIN
    image[10:25, 10:30] = DAB_BROWN
    image[35:50, 50:70] = FAINT_BROWN
    truth = np.zeros(image.shape[:2], dtype=bool)
    truth[10:25, 10:30] = True
    truth[35:50, 50:70] = True
    return image, truth


def test_dab_mask_finds_exactly_the_brown_regions() -> None:
    image, brown = _image_with_regions()
    mask = dab_mask(image, threshold=0.03)
    np.testing.assert_array_equal(mask, brown)
    # strong brown has more DAB than faint brown, and haematoxylin/glass have (almost) none
    dab = dab_channel(image)
    assert dab[15, 15] > dab[40, 60] > 0.03 > dab[30, 40]
    # a high threshold keeps only the strong brown block
    strong = dab_mask(image, threshold=0.1)
    assert strong[10:25, 10:30].all() and not strong[35:50, 50:70].any()


def test_patch_selection_keeps_patches_with_mask_fraction_above_threshold() -> None:
    # mask at 1/4 of level 0; patches of 16 level-0 px span 4x4 mask pixels
    mask = np.zeros((4, 12), dtype=bool)
    mask[0:4, 0:4] = True  # patch (x0=0): 16/16
    mask[0:2, 4:7] = True  # patch (x0=16): 6/16 = 0.375 > 0.35 -> kept
    mask[0:1, 8:12] = True
    mask[1, 8] = True  # patch (x0=32): 5/16 = 0.3125 -> dropped
    boxes, fractions = select_patches(mask, 4, 16, (48, 16), min_fraction=0.35)
    assert boxes == [Level0Box(0, 0, 16, 16), Level0Box(16, 0, 16, 16)]
    np.testing.assert_allclose(fractions, [1.0, 0.375])
    # a patch that would cross the slide's edge is not taken
    boxes, _ = select_patches(np.ones((4, 12), bool), 4, 16, (47, 16), min_fraction=0.35)
    assert [b.x0 for b in boxes] == [0, 16]


def test_patch_grid_uses_dab_and_falls_back_to_tissue_without_stain() -> None:
    image, brown = _image_with_regions()
    config = SlidingWindowConfig(patch_px=8, magnification=10.0, mask_downsample=1, stain_mask="dab")
    tissue = np.zeros(brown.shape, dtype=bool)
    tissue[5:55, 5:75] = True
    # objective 10x, magnification 10x: a patch is 8 level-0 px = 8 mask px
    grid = patch_grid(image, (80, 60), 10.0, config, tissue=tissue)
    assert grid.selection == "tissue+dab" and grid.patch_level0_px == 8
    for box, fraction in zip(grid.level0_boxes, grid.mask_fractions, strict=True):
        window = brown[box.y0:box.y0 + 8, box.x0:box.x0 + 8]
        assert fraction == pytest.approx(window.mean()) and fraction > 0.35
    assert len(grid.level0_boxes) > 0
    # no brown at all: falls back to the tissue mask, and says so
    blue_only = np.where(brown[..., None], np.array(HAEMATOXYLIN, np.uint8), image)
    fallback = patch_grid(blue_only, (80, 60), 10.0, config, tissue=tissue)
    assert fallback.selection.startswith("tissue (no patch passed")
    assert len(fallback.level0_boxes) > len(grid.level0_boxes)


def test_resnet18_is_the_standard_architecture_and_accepts_small_patches() -> None:
    standard = ResNet18(num_classes=1000, width=64)
    # torchvision's resnet18 has 11,689,512 parameters
    assert sum(p.numel() for p in standard.parameters()) == 11_689_512
    assert len([m for m in standard.modules() if m.__class__.__name__ == "BasicBlock"]) == 8
    small = ResNet18(num_classes=4, width=8).eval()
    with torch.no_grad():
        assert small(torch.rand(2, 3, 64, 64)).shape == (2, 4)
        assert small(torch.rand(1, 3, 224, 224)).shape == (1, 4)


def test_tiny_training_run_learns_brown_versus_blue_patches() -> None:
    rng = np.random.default_rng(0)
    colours = np.array([HAEMATOXYLIN, DAB_BROWN], dtype=np.float64)
    labels = np.tile([0, 1], 16)
    patches = colours[labels][:, None, None, :] + rng.normal(0, 12, size=(32, 16, 16, 3))
    patches = np.clip(patches, 0, 255).astype(np.uint8)
    config = SlidingWindowConfig(patch_px=16, resnet_width=8, epochs=5, batch_size=16, learning_rate=3e-3)
    model, losses = train_patch_classifier(patches, labels, num_classes=2, config=config, progress=False)
    assert len(losses) == 5 and all(np.isfinite(losses))
    assert losses[-1] < losses[0]
    probabilities = predict_patches(model, patches)
    assert probabilities.shape == (32, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (probabilities.argmax(axis=1) == labels).mean() == 1.0


def test_top_k_aggregation_averages_the_most_confident_patches() -> None:
    probs = np.array([
        [0.9, 0.1, 0.0, 0.0],  # confidence 0.9
        [0.2, 0.2, 0.6, 0.0],  # 0.6
        [0.0, 0.05, 0.0, 0.95],  # 0.95
        [0.3, 0.3, 0.2, 0.2],  # 0.3  (left out with k=3)
        [0.1, 0.1, 0.1, 0.7],  # 0.7
    ])
    predicted, confidence, mean, used = top_k_aggregate(probs, top_k=3)
    assert used.tolist() == [2, 0, 4]
    expected = (probs[2] + probs[0] + probs[4]) / 3  # [0.333, 0.083, 0.033, 0.55]
    np.testing.assert_allclose(mean, expected)
    assert predicted == 3 and confidence == pytest.approx(0.55)
    # fewer patches than k: all of them
    _, _, mean_all, used_all = top_k_aggregate(probs, top_k=15)
    assert len(used_all) == 5
    np.testing.assert_allclose(mean_all, probs.mean(axis=0))
    with pytest.raises(ValueError, match="n_patches"):
        top_k_aggregate(np.zeros((0, 4)))


def test_score_slide_reads_every_selected_patch_once_and_counts_pixels() -> None:
    image, _ = _image_with_regions()  # treat it as a 80x60 level-0 "slide" at 10x
    config = SlidingWindowConfig(patch_px=8, magnification=10.0, mask_downsample=1, stain_mask="dab", top_k=2)
    tissue = np.zeros(image.shape[:2], dtype=bool)
    tissue[5:55, 5:75] = True
    read_log: list[Level0Box] = []

    def read_patches(boxes):
        read_log.extend(boxes)
        return np.stack([image[b.y0:b.y0 + b.height, b.x0:b.x0 + b.width] for b in boxes])

    model = ResNet18(num_classes=2, width=8).eval()
    score = score_slide_sliding_window(model, image, (80, 60), 10.0, read_patches, config, tissue=tissue,
                                       chunk_patches=3)
    assert score.n_patches == len(read_log) == len(set(read_log))
    assert score.level0_pixels_read == 64 * score.n_patches
    assert score.fraction_level0_read == pytest.approx(64 * score.n_patches / (80 * 60))
    assert len(score.top_patches) == 2 and set(score.top_patches) <= set(read_log)
    assert sum(score.class_probabilities) == pytest.approx(1.0)
    assert score.timings_s["total_s"] >= score.timings_s["read_s"] >= 0
