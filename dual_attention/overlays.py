"""The overlay picture of one scored slide, readable at any slide size (the paper's Fig. 4 layout).

Top: the low-power view twice, side by side: the thumbnail with the sampled tiles as numbered boxes, and the
soft attention (min-max over the tissue, magma) over the faded thumbnail with the same boxes. Boxes are
drawn at least ``MIN_BOX_DISPLAY_PX`` wide (a 2048-px tile of a 3-gigapixel slide is a few display pixels),
and each number is placed where it covers no other number or box (a leader line joins a moved number to its
box). Below: one inset per tile at high power (``INSET_PX``), its glimpses as numbered boxes of the finest
scale in order, joined by the trail, captioned with the tile's number, class and probability.

Every text is drawn with PIL's scalable default font at ``FONT_PX`` or more; ``render_overlay`` returns the
image and an ``OverlayLayout`` (every drawn text box, tile box and inset in image pixels) so tests can check
legibility rather than trust it. No Ray, no pyplot: safe in worker processes and threads.

Coordinates: tiles and glimpse trails come in level-0 px; the low-power view maps them with
``slides.level0_to_thumb_rc`` (the one mapping between the frames), an inset with the tile's own box.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from dual_attention.slides import Level0Box, level0_to_thumb_rc

FONT_PX = 18  # numbers and captions
GLIMPSE_FONT_PX = 15
TITLE_FONT_PX = 22
PANEL_PX = 720  # the low-power panels' long side
MIN_BOX_DISPLAY_PX = 16
INSET_PX = 320
INSET_COLUMNS = 4
MARGIN_PX = 16
# One colour per tile (box on the low-power view = frame of its inset); cyan first.
TILE_COLOURS = ((0, 229, 255), (255, 234, 0), (255, 64, 129), (118, 255, 3), (255, 145, 0), (213, 0, 249),
                (255, 255, 255), (29, 233, 182))
GLIMPSE_RGB = (0, 200, 255)
BACKGROUND_RGB = (255, 255, 255)
TEXT_RGB = (20, 20, 20)

Rect = tuple[float, float, float, float]  # (x0, y0, x1, y1) image px

ReadTilePreview = Callable[[Level0Box, int], np.ndarray]
"""A level-0 box and a side in px -> that box as a (side, side, 3) uint8 image (e.g. ``Slide.read_box`` with
``out_px``, which reads from the pyramid level that fits)."""


@dataclass
class OverlayTile:
    level0_box: Level0Box
    caption: str  # e.g. "2+ (0.91)"
    glimpse_trail_level0: Sequence[tuple[float, float]] = ()
    image: np.ndarray | None = None  # the tile at high power, any size; None: cut from the thumbnail


@dataclass
class OverlayLayout:
    """Where things were drawn, in image px."""

    size: tuple[int, int]
    font_px: int
    panels: list[Rect] = field(default_factory=list)  # the low-power panels
    tile_boxes: list[Rect] = field(default_factory=list)  # on the first low-power panel, as drawn
    tile_number_boxes: list[Rect] = field(default_factory=list)  # the numbers' text boxes, first panel
    insets: list[Rect] = field(default_factory=list)
    captions: list[Rect] = field(default_factory=list)
    glimpse_number_boxes: list[list[Rect]] = field(default_factory=list)  # per inset


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _overlap(a: Rect, b: Rect) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _gap(a: Rect, b: Rect) -> float:
    """The distance between two rectangles (0 when they touch or overlap)."""
    dx = max(0.0, b[0] - a[2], a[0] - b[2])
    dy = max(0.0, b[1] - a[3], a[1] - b[3])
    return float(np.hypot(dx, dy))


def _leader(draw: ImageDraw.ImageDraw, label: Rect, target: Rect, colour: tuple[int, int, int]) -> None:
    """A line from a label moved away from its box to that box, when it is not beside it."""
    if _gap(label, target) > 3:
        draw.line([((label[0] + label[2]) / 2, (label[1] + label[3]) / 2),
                   ((target[0] + target[2]) / 2, (target[1] + target[3]) / 2)], fill=(0, 0, 0), width=3)
        draw.line([((label[0] + label[2]) / 2, (label[1] + label[3]) / 2),
                   ((target[0] + target[2]) / 2, (target[1] + target[3]) / 2)], fill=colour, width=1)


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Any, pad: int) -> tuple[float, float]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return x1 - x0 + 2 * pad, y1 - y0 + 2 * pad


def _place_label(size: tuple[float, float], anchor: Rect, bounds: Rect, taken: Sequence[Rect]) -> Rect:
    """A free spot for a label of ``size`` next to ``anchor``: the corners first, then rings further out;
    the spot that covers least of ``taken`` when none is free."""
    width, height = size
    ax0, ay0, ax1, ay1 = anchor
    best, best_cost = None, float("inf")
    for ring in range(0, 8):
        step = ring * height
        for x, y in ((ax0, ay0 - height - step), (ax1 - width, ay0 - height - step), (ax0, ay1 + step),
                     (ax1 - width, ay1 + step), (ax1 + 2 + step, ay0), (ax0 - width - 2 - step, ay0),
                     (ax1 + 2 + step, ay1 - height), (ax0 - width - 2 - step, ay1 - height)):
            x = min(max(x, bounds[0]), bounds[2] - width)
            y = min(max(y, bounds[1]), bounds[3] - height)
            rect = (x, y, x + width, y + height)
            cost = sum(_overlap(rect, t) for t in taken)
            if cost == 0:
                return rect
            if cost < best_cost:
                best, best_cost = rect, cost
    assert best is not None
    return best


def _label(draw: ImageDraw.ImageDraw, rect: Rect, text: str, font: Any, fill: tuple[int, int, int],
           text_rgb: tuple[int, int, int] = TEXT_RGB, pad: int = 3) -> None:
    draw.rectangle(rect, fill=fill, outline=(0, 0, 0))
    x0, y0, _, _ = draw.textbbox((0, 0), text, font=font)
    draw.text((rect[0] + pad - x0, rect[1] + pad - y0), text, font=font, fill=text_rgb)


def _min_size(rect: Rect, minimum: float) -> Rect:
    """``rect`` grown about its centre to at least ``minimum`` on each side."""
    x0, y0, x1, y1 = rect
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half_w, half_h = max(x1 - x0, minimum) / 2, max(y1 - y0, minimum) / 2
    return (cx - half_w, cy - half_h, cx + half_w, cy + half_h)


def _inside(rect: Rect, bounds: Rect) -> Rect:
    """``rect`` shifted into ``bounds`` (a box grown at the slide's edge must not reach the next panel)."""
    width, height = rect[2] - rect[0], rect[3] - rect[1]
    x0 = min(max(rect[0], bounds[0]), bounds[2] - width)
    y0 = min(max(rect[1], bounds[1]), bounds[3] - height)
    return (x0, y0, x0 + width, y0 + height)


def _attention_rgb(thumbnail: np.ndarray, attention_map: np.ndarray) -> np.ndarray:
    """The attention (min-max over its non-zero pixels, the tissue) in magma over the faded thumbnail."""
    faded = 255 - (255 - thumbnail.astype(np.float64)) * 0.35
    tissue = attention_map > 0
    out = faded.copy()
    if tissue.any():
        values = attention_map[tissue]
        span = float(values.max() - values.min())
        normalised = (attention_map - values.min()) / span if span > 0 else np.full(attention_map.shape, 0.5)
        heat = colormaps["magma"](np.clip(normalised, 0, 1))[..., :3] * 255
        out[tissue] = 0.25 * faded[tissue] + 0.75 * heat[tissue]
    return out.astype(np.uint8)


def _colour_bar(draw: ImageDraw.ImageDraw, x: float, y: float, width: float, font: Any) -> float:
    """The attention scale under the attention panel; returns its bottom."""
    height = 12
    for i in range(int(width)):
        r, g, b, _ = colormaps["magma"](i / max(1, width - 1))
        draw.line([(x + i, y), (x + i, y + height)], fill=(int(r * 255), int(g * 255), int(b * 255)))
    text_y = y + height + 3
    draw.text((x, text_y), "low", font=font, fill=TEXT_RGB)
    right = draw.textbbox((0, 0), "high", font=font)[2]
    draw.text((x + width - right, text_y), "high", font=font, fill=TEXT_RGB)
    middle = "attention (min-max over tissue)"
    draw.text((x + (width - draw.textbbox((0, 0), middle, font=font)[2]) / 2, text_y), middle, font=font,
              fill=TEXT_RGB)
    return text_y + FONT_PX + 4


def render_overlay(thumbnail_rgb: np.ndarray, attention_map: np.ndarray | None, tiles: Sequence[OverlayTile],
                   downsample: int, glimpse_level0_px: float | None = None, title: str | None = None
                   ) -> tuple[Image.Image, OverlayLayout]:
    """The overlay image and where its parts are (see the module doc)."""
    thumbnail_rgb = np.asarray(thumbnail_rgb)
    if thumbnail_rgb.ndim != 3 or thumbnail_rgb.shape[2] != 3:
        raise ValueError(f"thumbnail_rgb must be (h, w, 3), got shape {thumbnail_rgb.shape}")
    thumbnail_rgb = thumbnail_rgb.astype(np.uint8)
    has_attention = attention_map is not None and np.asarray(attention_map).size > 0
    if has_attention and np.asarray(attention_map).shape != thumbnail_rgb.shape[:2]:
        raise ValueError(
            f"attention_map shape {np.asarray(attention_map).shape} != thumbnail shape {thumbnail_rgb.shape[:2]}")
    rows, cols = thumbnail_rgb.shape[:2]
    font, glimpse_font, title_font = _font(FONT_PX), _font(GLIMPSE_FONT_PX), _font(TITLE_FONT_PX)

    scale = PANEL_PX / max(rows, cols)  # display px per thumbnail px (up for small slides, down for big)
    panel_w, panel_h = max(1, round(cols * scale)), max(1, round(rows * scale))
    n_panels = 2 if has_attention else 1
    n_tiles = len(tiles)
    columns = max(1, min(INSET_COLUMNS, n_tiles))
    inset_rows = -(-n_tiles // columns) if n_tiles else 0
    caption_h = FONT_PX + 10
    title_h = TITLE_FONT_PX + 2 * MARGIN_PX if title else MARGIN_PX
    bar_h = 12 + FONT_PX + 10 if has_attention else 0
    width = int(max(n_panels * panel_w + (n_panels + 1) * MARGIN_PX,
                    columns * INSET_PX + (columns + 1) * MARGIN_PX))
    panels_top = title_h
    insets_top = panels_top + panel_h + bar_h + 2 * MARGIN_PX
    height = int(insets_top + inset_rows * (INSET_PX + caption_h + MARGIN_PX) + MARGIN_PX)
    image = Image.new("RGB", (width, height), BACKGROUND_RGB)
    draw = ImageDraw.Draw(image)
    layout = OverlayLayout(size=(width, height), font_px=FONT_PX)
    if title:
        draw.text((MARGIN_PX, MARGIN_PX), title, font=title_font, fill=TEXT_RGB)

    # -- low power ---------------------------------------------------------------------------------------
    # Nearest-neighbour up, area average down: the panel shows the pixels the soft attention saw.
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BOX
    panels = [thumbnail_rgb] + ([_attention_rgb(thumbnail_rgb, np.asarray(attention_map, np.float64))]
                                if has_attention else [])
    origins = []
    for index, picture in enumerate(panels):
        x0 = MARGIN_PX + index * (panel_w + MARGIN_PX)
        image.paste(Image.fromarray(picture).resize((panel_w, panel_h), resample), (x0, panels_top))
        origins.append((x0, panels_top))
    if has_attention:
        _colour_bar(draw, origins[1][0], panels_top + panel_h + 6, panel_w, glimpse_font)

    def to_display(x_level0: float, y_level0: float, origin: tuple[int, int]) -> tuple[float, float]:
        row, col = level0_to_thumb_rc(x_level0, y_level0, downsample)
        # Thumbnail pixel (row, col) spans [col, col + 1) on the panel: its centre is at col + 0.5.
        return origin[0] + (col + 0.5) * scale, origin[1] + (row + 0.5) * scale

    for panel_index, origin in enumerate(origins):
        bounds = (origin[0], origin[1], origin[0] + panel_w, origin[1] + panel_h)
        layout.panels.append(bounds)
        boxes = []
        for tile in tiles:
            box = tile.level0_box
            x0, y0 = to_display(box.x0, box.y0, origin)
            x1, y1 = to_display(box.x0 + box.width, box.y0 + box.height, origin)
            grown = _min_size((x0 - 0.5 * scale, y0 - 0.5 * scale, x1 - 0.5 * scale, y1 - 0.5 * scale),
                              MIN_BOX_DISPLAY_PX)
            boxes.append(_inside(grown, bounds))
        for i, rect in enumerate(boxes):
            colour = TILE_COLOURS[i % len(TILE_COLOURS)]
            draw.rectangle(rect, outline=(0, 0, 0), width=4)  # a dark rim: the colour shows on any background
            draw.rectangle(rect, outline=colour, width=2)
        taken = list(boxes)
        for i, rect in enumerate(boxes):
            colour = TILE_COLOURS[i % len(TILE_COLOURS)]
            text = str(i + 1)
            spot = _place_label(_text_size(draw, text, font, 3), rect, bounds, taken)
            taken.append(spot)
            _leader(draw, spot, rect, colour)
            _label(draw, spot, text, font, colour)
            if panel_index == 0:
                layout.tile_number_boxes.append(spot)
        if panel_index == 0:
            layout.tile_boxes = boxes

    # -- high power: one inset per tile ---------------------------------------------------------------------
    for i, tile in enumerate(tiles):
        colour = TILE_COLOURS[i % len(TILE_COLOURS)]
        column, row = i % columns, i // columns
        x0 = MARGIN_PX + column * (INSET_PX + MARGIN_PX)
        y0 = insets_top + row * (INSET_PX + caption_h + MARGIN_PX)
        # An inset cut from the thumbnail says so: it is not the high-power view it stands in for.
        caption = f"{i + 1}: {tile.caption}" + (" (thumbnail)" if tile.image is None else "")
        caption_rect = (x0, y0, x0 + _text_size(draw, caption, font, 3)[0], y0 + _text_size(draw, caption, font, 3)[1])
        _label(draw, caption_rect, caption, font, colour)
        layout.captions.append(caption_rect)
        top = y0 + caption_h
        picture = tile.image if tile.image is not None else _thumbnail_crop(thumbnail_rgb, tile.level0_box,
                                                                              downsample)
        picture = Image.fromarray(np.asarray(picture, np.uint8))
        # Area average down (a 2048-px tile), bilinear up (a thumbnail crop): no aliasing either way.
        down = picture.width >= INSET_PX
        image.paste(picture.resize((INSET_PX, INSET_PX), Image.Resampling.BOX if down else Image.Resampling.BILINEAR),
                    (x0, top))
        inset = (x0, top, x0 + INSET_PX, top + INSET_PX)
        draw.rectangle((inset[0] - 2, inset[1] - 2, inset[2] + 1, inset[3] + 1), outline=colour, width=3)
        layout.insets.append(inset)
        layout.glimpse_number_boxes.append(
            _draw_glimpses(draw, tile, inset, glimpse_level0_px, glimpse_font))
    return image, layout


def _thumbnail_crop(thumbnail: np.ndarray, box: Level0Box, downsample: int) -> np.ndarray:
    """The tile as the thumbnail has it (when no level-0 read is at hand): a blurry stand-in."""
    row0, col0 = level0_to_thumb_rc(box.x0, box.y0, downsample)
    row1, col1 = level0_to_thumb_rc(box.x0 + box.width, box.y0 + box.height, downsample)
    r0, c0 = max(0, int(np.floor(row0 + 0.5))), max(0, int(np.floor(col0 + 0.5)))
    r1, c1 = max(r0 + 1, int(np.ceil(row1 + 0.5))), max(c0 + 1, int(np.ceil(col1 + 0.5)))
    crop = thumbnail[r0:r1, c0:c1]
    return crop if crop.size else np.full((1, 1, 3), 255, np.uint8)


def _draw_glimpses(draw: ImageDraw.ImageDraw, tile: OverlayTile, inset: Rect, glimpse_level0_px: float | None,
                   font: Any) -> list[Rect]:
    box = tile.level0_box
    px_per_level0 = (inset[2] - inset[0]) / box.width
    centres = [(inset[0] + (x - box.x0) * px_per_level0, inset[1] + (y - box.y0) * px_per_level0)
               for x, y in tile.glimpse_trail_level0]
    if len(centres) >= 2:
        draw.line(centres, fill=(0, 0, 0), width=4)
        draw.line(centres, fill=GLIMPSE_RGB, width=2)
    half = max(3.0, (glimpse_level0_px or 0) * px_per_level0 / 2)
    rects = [(cx - half, cy - half, cx + half, cy + half) for cx, cy in centres]
    for rect in rects:
        draw.rectangle(rect, outline=(0, 0, 0), width=3)
        draw.rectangle(rect, outline=GLIMPSE_RGB, width=1)
    numbers: list[Rect] = []
    for step, rect in enumerate(rects):
        text = str(step + 1)
        spot = _place_label(_text_size(draw, text, font, 2), rect, inset, rects + numbers)
        numbers.append(spot)
        _leader(draw, spot, rect, GLIMPSE_RGB)
        _label(draw, spot, text, font, GLIMPSE_RGB, pad=2)
    return numbers


# -- a scored slide ---------------------------------------------------------------------------------------------


def overlay_tiles(slide_score: Any, class_names: Sequence[str] | None = None,
                  tile_images: Sequence[np.ndarray] | None = None) -> list[OverlayTile]:
    """A ``pipeline.SlideScore``'s tiles, captioned with class (name when given) and its probability."""
    tiles = list(slide_score.tiles)
    if tile_images is not None and len(tile_images) != len(tiles):
        raise ValueError(f"{len(tile_images)} tile images for {len(tiles)} tiles")
    out = []
    for index, tile in enumerate(tiles):
        name = class_names[tile.predicted_class] if class_names is not None else str(tile.predicted_class)
        out.append(OverlayTile(level0_box=tile.level0_box,
                               caption=f"{name} ({tile.class_probabilities[tile.predicted_class]:.2f})",
                               glimpse_trail_level0=list(tile.glimpse_trail_level0),
                               image=None if tile_images is None else tile_images[index]))
    return out


def read_tile_previews(read: ReadTilePreview, slide_score: Any, side_px: int = INSET_PX) -> list[np.ndarray]:
    """Each tile of ``slide_score`` at inset size through ``read`` (e.g. ``lambda box, px:
    slide.read_box(box, out_px=(px, px))``)."""
    return [read(tile.level0_box, side_px) for tile in slide_score.tiles]


def slide_score_overlay(thumbnail_rgb: np.ndarray, slide_score: Any, downsample: int, title: str | None = None,
                        class_names: Sequence[str] | None = None, tile_images: Sequence[np.ndarray] | None = None,
                        glimpse_level0_px: float | None = None) -> tuple[Image.Image, OverlayLayout]:
    return render_overlay(thumbnail_rgb, slide_score.attention_map,
                          overlay_tiles(slide_score, class_names, tile_images), downsample,
                          glimpse_level0_px=glimpse_level0_px, title=title)


def save_slide_score_overlay(path: str | Path, thumbnail_rgb: np.ndarray, slide_score: Any, downsample: int,
                             title: str | None = None, class_names: Sequence[str] | None = None,
                             tile_images: Sequence[np.ndarray] | None = None,
                             glimpse_level0_px: float | None = None) -> Path:
    """Render and write the overlay PNG of one scored slide (folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image, _ = slide_score_overlay(thumbnail_rgb, slide_score, downsample, title, class_names, tile_images,
                                   glimpse_level0_px)
    image.save(path, format="PNG")
    return path


def overlay_png_bytes(thumbnail_rgb: np.ndarray, slide_score: Any, downsample: int, title: str | None = None,
                      class_names: Sequence[str] | None = None, tile_images: Sequence[np.ndarray] | None = None,
                      glimpse_level0_px: float | None = None) -> bytes:
    """The overlay PNG as bytes (for an HTTP answer)."""
    buffer = io.BytesIO()
    image, _ = slide_score_overlay(thumbnail_rgb, slide_score, downsample, title, class_names, tile_images,
                                   glimpse_level0_px)
    image.save(buffer, format="PNG")
    return buffer.getvalue()
