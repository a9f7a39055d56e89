"""The overlay PNG is readable at any slide size: numbered tile boxes at a minimum display size whose numbers
never cover each other, one inset per tile at high power, and every text at least 14 px high."""

from __future__ import annotations

import numpy as np
import pytest

from dual_attention.overlays import (
    INSET_PX,
    MIN_BOX_DISPLAY_PX,
    OverlayLayout,
    overlay_png_bytes,
    read_tile_previews,
    render_overlay,
    slide_score_overlay,
)
from dual_attention.pipeline import SlideScore, TileScore, aggregate
from dual_attention.slides import Level0Box, thumb_rc_to_level0_xy

MIN_TEXT_PX = 14


def _scored(rows: int, cols: int, tile_px: int, n_tiles: int, n_glimpses: int, seed: int) -> SlideScore:
    """Tiles crowded round one attention peak (as a trained SAM picks them), a few elsewhere."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols]
    peak_r, peak_c = rows * 0.35, cols * 0.6
    tissue = ((yy - rows / 2) / (rows * 0.45)) ** 2 + ((xx - cols / 2) / (cols * 0.45)) ** 2 < 1
    attention = np.where(tissue, np.exp(-((yy - peak_r) ** 2 + (xx - peak_c) ** 2) / (0.02 * rows * cols)), 0.0)
    tiles = []
    for i in range(n_tiles):
        spread = 0.02 if i < 2 * n_tiles // 3 else 0.25
        r = float(np.clip(peak_r + rng.normal(0, spread * rows), 0, rows - 1))
        c = float(np.clip(peak_c + rng.normal(0, spread * cols), 0, cols - 1))
        x, y = thumb_rc_to_level0_xy(r, c, 32)
        box = Level0Box(int(x - tile_px / 2), int(y - tile_px / 2), tile_px, tile_px)
        probabilities = rng.dirichlet(np.ones(4))
        trail = [(box.x0 + rng.uniform(0.1, 0.9) * tile_px, box.y0 + rng.uniform(0.1, 0.9) * tile_px)
                 for _ in range(n_glimpses)]
        tiles.append(TileScore(box, float(rng.uniform()), int(np.argmax(probabilities)),
                               [float(p) for p in probabilities], trail))
    return aggregate(tiles, "her2", (cols * 32, rows * 32), attention_map=attention / attention.sum())


def _overlaps(rects: list[tuple[float, float, float, float]]) -> int:
    count = 0
    for i, a in enumerate(rects):
        for b in rects[i + 1:]:
            if min(a[2], b[2]) - max(a[0], b[0]) > 0 and min(a[3], b[3]) - max(a[1], b[1]) > 0:
                count += 1
    return count


def _assert_legible(layout: OverlayLayout, n_tiles: int, n_glimpses: int) -> None:
    assert layout.font_px >= MIN_TEXT_PX
    width, height = layout.size
    assert len(layout.tile_boxes) == len(layout.tile_number_boxes) == len(layout.insets) == n_tiles
    assert all(r[2] - r[0] >= MIN_BOX_DISPLAY_PX and r[3] - r[1] >= MIN_BOX_DISPLAY_PX for r in layout.tile_boxes)
    assert all(r[3] - r[1] >= MIN_TEXT_PX for r in layout.tile_number_boxes + layout.captions)
    assert _overlaps(layout.tile_number_boxes) == 0  # the numbers never pile up
    assert all(r[2] - r[0] >= INSET_PX and r[3] - r[1] >= INSET_PX for r in layout.insets)
    assert _overlaps(layout.insets + layout.captions) == 0
    for numbers in layout.glimpse_number_boxes:
        assert len(numbers) == n_glimpses and _overlaps(numbers) == 0
        assert all(r[3] - r[1] >= MIN_TEXT_PX for r in numbers)
    panel = layout.panels[0]
    assert all(panel[0] <= r[0] and panel[1] <= r[1] and r[2] <= panel[2] and r[3] <= panel[3]
               for r in layout.tile_boxes + layout.tile_number_boxes)  # nothing spills into the next panel
    everything = layout.tile_number_boxes + layout.captions + layout.insets
    assert all(r[0] >= 0 and r[1] >= 0 and r[2] <= width and r[3] <= height for r in everything)


@pytest.mark.parametrize(("name", "rows", "cols", "tile_px"), [
    ("3.2-GP slide, cpu-small tiles", 1536, 2048, 256),  # a tile is 8 of 2048 thumbnail px
    ("3.2-GP slide, paper tiles", 1536, 2048, 2048),
    ("quickstart-size slide", 96, 96, 256),  # 3072² level 0: the thumbnail is scaled up
])
def test_overlay_is_legible_at_any_slide_size(name: str, rows: int, cols: int, tile_px: int) -> None:
    score = _scored(rows, cols, tile_px, n_tiles=10, n_glimpses=6, seed=rows + tile_px)
    images = [np.full((320, 320, 3), 200, np.uint8)] * len(score.tiles)
    image, layout = slide_score_overlay(np.full((rows, cols, 3), 230, np.uint8), score, 32, title=name,
                                        class_names=("0", "1+", "2+", "3+"), tile_images=images,
                                        glimpse_level0_px=tile_px / 8)
    assert image.size == layout.size
    _assert_legible(layout, n_tiles=10, n_glimpses=6)


def test_insets_show_the_tiles_at_high_power() -> None:
    """Each inset is its tile's image (here a flat colour per tile), not the thumbnail's few pixels."""
    score = _scored(1536, 2048, 2048, n_tiles=3, n_glimpses=2, seed=1)
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]

    def read(box: Level0Box, side_px: int) -> np.ndarray:
        index = [t.level0_box for t in score.tiles].index(box)
        return np.broadcast_to(np.array(colours[index], np.uint8), (side_px, side_px, 3)).copy()

    previews = read_tile_previews(read, score)
    assert [p.shape for p in previews] == [(INSET_PX, INSET_PX, 3)] * 3
    image, layout = slide_score_overlay(np.full((1536, 2048, 3), 230, np.uint8), score, 32, tile_images=previews,
                                        glimpse_level0_px=128)
    pixels = np.asarray(image)
    for (x0, y0, x1, y1), colour in zip(layout.insets, colours, strict=True):
        centre = pixels[int(y0) + 8:int(y1) - 8, int(x0) + 8:int(x1) - 8].reshape(-1, 3)
        share = np.mean(np.all(centre == colour, axis=1))
        assert share > 0.7, (colour, share)  # the rest: glimpse boxes, their numbers and the trail


def test_overlay_png_bytes_without_attention_or_tile_images() -> None:
    score = _scored(64, 48, 256, n_tiles=2, n_glimpses=3, seed=2)
    score.attention_map = np.zeros((0, 0))
    png = overlay_png_bytes(np.full((64, 48, 3), 230, np.uint8), score, 32)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    _, layout = render_overlay(np.full((64, 48, 3), 230, np.uint8), None, [], 32)
    assert layout.insets == [] and layout.size[0] > 0
