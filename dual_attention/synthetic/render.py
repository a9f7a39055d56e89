"""Pixels of any level-0 region of a ``SlideLayout`` (``render_region``), by Beer-Lambert: stain
concentrations times optical-density vectors, ``rgb = white * exp(-OD)``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from dual_attention.synthetic.layout import (
    _OD_PEN,
    _TEXTURE_PX,
    CELL_PX,
    FIELD_PX,
    RENDER_CHUNK_PX,
    TILE_PX,
    Discs,
    SlideLayout,
    Stroke,
    _cell_key,
    _hash_uniform,
)

# Optical density per unit concentration (rows of skimage.color.rgb_from_hed, normalised).
_OD_HAEMATOXYLIN = np.array([0.65, 0.70, 0.29], np.float32)
_OD_DAB = np.array([0.27, 0.57, 0.78], np.float32)
_OD_HAEMATOXYLIN /= np.linalg.norm(_OD_HAEMATOXYLIN)
_OD_DAB /= np.linalg.norm(_OD_DAB)
_OD_BLOOD = np.array([0.08, 0.95, 0.80], np.float32)
_OD_BUBBLE_EDGE = np.array([0.35, 0.35, 0.33], np.float32)
_GLASS_RGB = np.array([243.0, 242.0, 240.0], np.float32)


CELL_NONE, CELL_STROMA, CELL_TUMOUR, CELL_LYMPHOCYTE = 0, 1, 2, 3


def _bilinear(field_grid: np.ndarray, x_level0: np.ndarray, y_level0: np.ndarray) -> np.ndarray:
    coords = [y_level0 / FIELD_PX - 0.5, x_level0 / FIELD_PX - 0.5]
    return ndimage.map_coordinates(field_grid, coords, order=1, mode="nearest")


def _cells(layout: SlideLayout, row0: int, col0: int, n_rows: int, n_cols: int) -> dict[str, np.ndarray]:
    """Attributes of the cells of grid rows row0..row0+n_rows-1 and columns col0.. (2-D arrays)."""
    rows, cols = np.meshgrid(
        np.arange(row0, row0 + n_rows, dtype=np.int64), np.arange(col0, col0 + n_cols, dtype=np.int64), indexing="ij"
    )
    key = _cell_key(layout.seed, rows + (1 << 20), cols + (1 << 20))
    u = [_hash_uniform(key, salt) for salt in range(6)]
    # Centre, jittered inside its grid cell; evaluated first with a mid jitter to classify the cell.
    cx0 = (cols + 0.5) * CELL_PX
    cy0 = (rows + 0.5) * CELL_PX
    inside = (cx0 < layout.width_level0_px) & (cy0 < layout.height_level0_px)
    tissue = _bilinear(layout.tissue_field, cx0, cy0) > layout.thresholds["tissue"]
    tumour = tissue & (_bilinear(layout.tumour_field, cx0, cy0) > layout.thresholds["tumour"])
    lymph = tissue & ~tumour & (_bilinear(layout.lymph_field, cx0, cy0) > layout.thresholds["lymph"])
    kind = np.where(tumour, CELL_TUMOUR, np.where(lymph, CELL_LYMPHOCYTE, np.where(tissue, CELL_STROMA, CELL_NONE)))
    kind = np.where(inside, kind, CELL_NONE).astype(np.int8)

    jitter = np.where(kind == CELL_TUMOUR, 0.30, 0.42).astype(np.float32)
    cx = cx0 + (u[0] - 0.5) * 2 * jitter * CELL_PX
    cy = cy0 + (u[1] - 0.5) * 2 * jitter * CELL_PX

    p = layout.params
    has_nucleus = np.select(
        [kind == CELL_TUMOUR, kind == CELL_LYMPHOCYTE, kind == CELL_STROMA],
        [u[2] < 0.97, u[2] < 0.9, u[2] < p["stroma_cellularity"]],
        False,
    )
    radius = np.select(
        [kind == CELL_TUMOUR, kind == CELL_LYMPHOCYTE],
        [(4.0 + 1.6 * u[3]) * p["tumour_nucleus_scale"], 3.0 + 0.5 * u[3]],
        2.2 + 1.0 * u[3],
    )
    nuclear_h = np.select(
        [kind == CELL_TUMOUR, kind == CELL_LYMPHOCYTE], [0.75 + 0.3 * u[4], 1.15 + 0.2 * u[4]], 0.9 + 0.2 * u[4]
    )
    nuclear_dab = np.where(kind == CELL_TUMOUR, p["tumour_nuclear_dab"], p["normal_nuclear_dab"])
    nuclear_dab = nuclear_dab * (0.8 + 0.4 * u[5]) * (kind != CELL_NONE)
    # DAB-positive nuclei carry less visible haematoxylin (DAB masks the counterstain).
    nuclear_h = nuclear_h * (1.0 - 0.2 * np.clip(nuclear_dab, 0, 1))
    membrane_dab = np.where(kind == CELL_TUMOUR, p["membrane_dab"] * (0.85 + 0.3 * u[5]), 0.0)
    return {
        "kind": kind,
        "cx": cx.astype(np.float32),
        "cy": cy.astype(np.float32),
        "radius": np.where(has_nucleus, radius, -10.0).astype(np.float32),
        "nuclear_h": (nuclear_h * p["haematoxylin_gain"]).astype(np.float32),
        "nuclear_dab": (nuclear_dab * p["dab_gain"]).astype(np.float32),
        "membrane_dab": (membrane_dab * p["dab_gain"]).astype(np.float32),
        "key": key,
    }


def render_region(layout: SlideLayout, x0: int, y0: int, width: int, height: int) -> np.ndarray:
    """(height, width, 3) uint8 RGB of the level-0 box at (x0, y0); pixels outside the slide are glass."""
    f32 = np.float32
    # Work on whole grid cells, then crop.
    row0, col0 = y0 // CELL_PX, x0 // CELL_PX
    n_rows = -(-(y0 + height) // CELL_PX) - row0
    n_cols = -(-(x0 + width) // CELL_PX) - col0
    oy, ox = row0 * CELL_PX, col0 * CELL_PX  # level-0 origin of the working grid
    cells = _cells(layout, row0 - 1, col0 - 1, n_rows + 2, n_cols + 2)
    ext_cols = n_cols + 2

    # Worley pass: nearest cell (index into the 3x3 neighbourhood) and the two smallest squared
    # distances, on pixels shaped (cell rows, g, cell cols, g) so that cell arrays broadcast.
    g = CELL_PX
    py = (np.arange(g, dtype=f32) + f32(0.5)).reshape(1, g, 1, 1)
    px = (np.arange(g, dtype=f32) + f32(0.5)).reshape(1, 1, 1, g)
    cell_y = (cells["cy"] - oy - (np.arange(-1, n_rows + 1) * g)[:, None]).astype(f32)  # centre within own row
    cell_x = (cells["cx"] - ox - (np.arange(-1, n_cols + 1) * g)[None, :]).astype(f32)
    shape = (n_rows, g, n_cols, g)
    d1 = np.full(shape, np.inf, f32)
    d2 = np.full(shape, np.inf, f32)
    nearest_k = np.zeros(shape, np.int8)
    d = np.empty(shape, f32)
    closer = np.empty(shape, bool)
    for k in range(9):
        di, dj = k // 3 - 1, k % 3 - 1
        sl = (slice(1 + di, 1 + di + n_rows), slice(1 + dj, 1 + dj + n_cols))
        dy = py - (cell_y[sl] + di * g)[:, None, :, None]
        dx = px - (cell_x[sl] + dj * g)[:, None, :, None]
        np.add(dy * dy, dx * dx, out=d)
        np.less(d, d1, out=closer)
        nearest_k[closer] = k
        np.minimum(d2, np.maximum(d1, d), out=d2)
        np.minimum(d1, d, out=d1)
    base = ((np.arange(n_rows) + 1) * ext_cols).reshape(n_rows, 1, 1, 1) + (np.arange(n_cols) + 1).reshape(
        1, 1, n_cols, 1
    )
    offsets = np.array([(k // 3 - 1) * ext_cols + (k % 3 - 1) for k in range(9)], np.int32)
    nearest = (base.astype(np.int32) + offsets[nearest_k]).reshape(n_rows * g, n_cols * g)
    d1 = np.sqrt(d1).reshape(nearest.shape)
    d2 = np.sqrt(d2).reshape(nearest.shape)
    del d, closer, nearest_k

    def at(name: str, index: np.ndarray = nearest) -> np.ndarray:
        return cells[name].ravel().take(index)

    p = layout.params
    kind = at("kind")
    in_tissue = kind != CELL_NONE
    is_tumour = kind == CELL_TUMOUR
    texture, camera = _texture_views(layout, ox, oy, n_cols * g, n_rows * g)

    # Nucleus coverage with a one-pixel soft edge (anti-aliasing), textured.
    nucleus = at("radius") - d1
    nucleus += f32(0.5)
    np.clip(nucleus, 0.0, 1.0, out=nucleus)
    nucleus *= f32(1.0) + f32(0.12) * texture
    haematoxylin = np.where(is_tumour, f32(p["tumour_cytoplasm_h"]), f32(0.09)) * in_tissue
    haematoxylin *= (f32(1.0) + f32(0.25) * texture) * f32(p["haematoxylin_gain"])
    haematoxylin += nucleus * at("nuclear_h")
    dab = nucleus * at("nuclear_dab")
    if p["cytoplasm_blush"] > 0:
        dab += is_tumour * (f32(p["cytoplasm_blush"] * p["dab_gain"]) * (f32(1.0) + f32(0.15) * texture))

    # Membranes of tumour cells: pixels near the bisector with the second-nearest cell, (d2 - d1) / 2.
    membrane = f32(p["membrane_half_width_px"] + 0.5) - f32(0.5) * (d2 - d1)
    np.clip(membrane, 0.0, 1.0, out=membrane)
    membrane *= is_tumour
    on = np.nonzero(membrane)
    haematoxylin[on] += f32(0.12 * p["haematoxylin_gain"]) * membrane[on]
    if p["membrane_dab"] > 0 and len(on[0]):
        # Each cell's ring is cut in eight sectors, each stained or not: incomplete rings for 1+.
        cell = nearest[on]
        ry = (on[0] + oy + 0.5).astype(f32) - cells["cy"].ravel().take(cell)
        rx = (on[1] + ox + 0.5).astype(f32) - cells["cx"].ravel().take(cell)
        sector = (rx > 0) * 4 + (ry > 0) * 2 + (np.abs(rx) > np.abs(ry))
        key = cells["key"].ravel().take(cell) ^ sector.astype(np.uint64)
        stained = _hash_uniform(key, 77) < p["membrane_completeness"]
        dab[on] += membrane[on] * cells["membrane_dab"].ravel().take(cell) * stained * (1.0 + 0.1 * texture[on])

    od = np.empty(nearest.shape + (3,), f32)
    for c in range(3):
        np.multiply(haematoxylin, _OD_HAEMATOXYLIN[c], out=od[..., c])
        od[..., c] += dab * _OD_DAB[c]
    _draw_discs(od, layout.debris, ox, oy, _OD_DAB * p["dab_gain"], ring=False)
    _draw_discs(od, layout.blood, ox, oy, _OD_BLOOD, ring=True)
    for stroke in layout.strokes:
        if stroke.kind == "fold":
            band = _stroke_coverage(stroke, ox, oy, od.shape[1], od.shape[0])
            if band is not None:
                # A fold doubles the tissue over itself: optical density roughly doubles inside the band.
                od *= 1.0 + 0.9 * (band * in_tissue)[..., None]
    for stroke in layout.strokes:
        if stroke.kind.startswith("pen:"):
            cover = _stroke_coverage(stroke, ox, oy, od.shape[1], od.shape[0])
            if cover is not None:
                od += (0.8 * cover)[..., None] * _OD_PEN[stroke.kind.split(":")[1]]
    _draw_bubbles(od, layout.bubbles, ox, oy)

    np.negative(od, out=od)
    np.exp(od, out=od)
    od *= _GLASS_RGB
    od += (f32(2.0) * camera + f32(0.5))[..., None]
    np.clip(od, 0, 255, out=od)
    return od[y0 - oy : y0 - oy + height, x0 - ox : x0 - ox + width].astype(np.uint8)


def _texture_views(layout: SlideLayout, ox: int, oy: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Tissue texture and camera noise for a region: periodic (prime period) in level-0 coordinates."""
    if layout._texture_wrapped is None or width > RENDER_CHUNK_PX + 2 * CELL_PX or height > TILE_PX + 2 * CELL_PX:
        ys = (np.arange(oy, oy + height) % _TEXTURE_PX)[:, None]
        xs = (np.arange(ox, ox + width) % _TEXTURE_PX)[None, :]
        return layout.texture[0][ys, xs], layout.texture[1][ys, xs]
    wrapped = layout._texture_wrapped
    ty, tx = oy % _TEXTURE_PX, ox % _TEXTURE_PX
    return wrapped[0, ty : ty + height, tx : tx + width], wrapped[1, ty : ty + height, tx : tx + width]


def _draw_discs(od: np.ndarray, discs: Discs, ox: int, oy: int, od_vector: np.ndarray, ring: bool) -> None:
    h, w = od.shape[:2]
    for i in discs.in_box(ox, oy, ox + w, oy + h):
        x, y, r, s = discs.x[i] - ox, discs.y[i] - oy, discs.radius[i], discs.strength[i]
        xa, xb = max(int(x - r - 1), 0), min(int(x + r + 2), w)
        ya, yb = max(int(y - r - 1), 0), min(int(y + r + 2), h)
        if xa >= xb or ya >= yb:
            continue
        yy, xx = np.mgrid[ya:yb, xa:xb].astype(np.float32) + 0.5
        d = np.sqrt((yy - y) ** 2 + (xx - x) ** 2)
        cover = np.clip(r - d + 0.5, 0.0, 1.0)
        if ring:  # red blood cells: biconcave, paler centre
            cover = cover * (0.55 + 0.45 * np.clip(d / r, 0, 1))
        od[ya:yb, xa:xb] += (s * cover)[..., None] * od_vector


def _draw_bubbles(od: np.ndarray, bubbles: np.ndarray, ox: int, oy: int) -> None:
    h, w = od.shape[:2]
    for x, y, r in bubbles:
        x, y = x - ox, y - oy
        xa, xb = max(int(x - r - 4), 0), min(int(x + r + 5), w)
        ya, yb = max(int(y - r - 4), 0), min(int(y + r + 5), h)
        if xa >= xb or ya >= yb:
            continue
        yy, xx = np.mgrid[ya:yb, xa:xb].astype(np.float32) + 0.5
        d = np.sqrt((yy - y) ** 2 + (xx - x) ** 2)
        edge = np.clip(2.5 - np.abs(d - r) + 0.5, 0.0, 1.0)
        od[ya:yb, xa:xb] += edge[..., None] * _OD_BUBBLE_EDGE


def _stroke_coverage(stroke: Stroke, ox: int, oy: int, w: int, h: int) -> np.ndarray | None:
    """Coverage in [0, 1] of a region by a stroke, or None when they do not meet; computed per segment
    only inside the segment's own bounding box."""
    bx0, by0, bx1, by1 = stroke.bbox()
    if bx1 < ox or by1 < oy or bx0 > ox + w or by0 > oy + h:
        return None
    best = np.full((h, w), np.inf, np.float32)
    pad = stroke.half_width_px + 2
    for (ax, ay), (bx, by) in zip(stroke.points[:-1], stroke.points[1:], strict=True):
        xa, xb = max(int(min(ax, bx) - pad) - ox, 0), min(int(max(ax, bx) + pad) + 1 - ox, w)
        ya, yb = max(int(min(ay, by) - pad) - oy, 0), min(int(max(ay, by) + pad) + 1 - oy, h)
        if xa >= xb or ya >= yb:
            continue
        yy = (np.arange(ya, yb, dtype=np.float32) + (oy + 0.5))[:, None]
        xx = (np.arange(xa, xb, dtype=np.float32) + (ox + 0.5))[None, :]
        vx, vy = bx - ax, by - ay
        t = np.clip(((xx - ax) * vx + (yy - ay) * vy) / max(vx * vx + vy * vy, 1e-6), 0.0, 1.0)
        d = np.hypot(xx - (ax + t * vx), yy - (ay + t * vy))
        np.minimum(best[ya:yb, xa:xb], d, out=best[ya:yb, xa:xb])
    if not np.isfinite(best).any():
        return None
    return np.clip(stroke.half_width_px - best + 0.5, 0.0, 1.0)
