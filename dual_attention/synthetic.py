"""Synthetic IHC cohort: pyramidal JPEG-tiled TIFF slides that OpenSlide opens, plus a Parquet manifest.

A slide is drawn procedurally from a seeded *layout* (``SlideLayout``): coarse fields at 1/32 of level 0
say where tissue, tumour and lymphocyte aggregates are; cells sit on a jittered 16-px grid whose jitter
and attributes come from an integer hash of the cell's global index, so any level-0 region can be
rendered on its own, in any order, with identical pixels (that is what makes streaming possible);
sparse objects (brown debris specks, red blood cells, bubbles, pen strokes, tissue folds) are short
lists in level-0 coordinates.

Colour follows Beer-Lambert: stain concentrations times optical-density vectors (haematoxylin and DAB
from scikit-image's ``rgb_from_hed``, so ``skimage.color.rgb2hed`` recovers them), ``rgb = white *
exp(-OD)``.

The label lives in high-power detail only:

* HER2 (0, 1+, 2+, 3+): DAB on tumour-cell membranes, graded by intensity and by completeness of the
  ring (1+ faint and broken, 2+ moderate and complete, 3+ strong, thick and complete). Per-slide random
  cytoplasmic DAB blush, brown debris, tumour fraction and stain strength make the thumbnail's colour
  overlap across classes (``benchmarks/bench_thumbnail_baseline.py`` measures it).
* MMR (0 intact, 1 loss): DAB in tumour nuclei (intact) or haematoxylin only (loss); non-tumour nuclei
  (stroma, lymphocytes) are brown in both, as the internal positive control.

Writing streams: level 0 is rendered one strip of tiles at a time; each strip is downsampled 2x into a
temporary file that feeds the next level, so memory stays bounded by a strip (width x tile rows), never
a level.

What OpenSlide sees: each level is a tiled JPEG page in the main IFD chain (largest first, reduced levels
``subfiletype=1``), mpp 0.25 from the resolution tags. Level 0 carries an Aperio-style ImageDescription
(``AppMag = 40|MPP = 0.25``), so OpenSlide opens the file with its aperio driver (vendor ``aperio``) and
reports ``openslide.objective-power`` = 40; its generic-tiff driver never reports an objective power
(``objective_power=None`` / ``--plain-tiff`` writes such a file: vendor ``generic-tiff``, mpp only).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext as _nothing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from dual_attention.config import CLASS_NAMES, NUM_CLASSES
from dual_attention.manifest import ManifestRow, write_manifest

# -- constants --------------------------------------------------------------------------------------------

MPP_40X = 0.25  # micrometres per level-0 pixel at 40x
OBJECTIVE_POWER = 40
CELL_PX = 16  # cell grid pitch at level 0: tumour cells ~16 px across, nuclei 8-11 px
FIELD_PX = 32  # coarse layout fields (tissue, tumour, lymphocytes) are sampled every 32 level-0 px
TILE_PX = 256  # TIFF tile side
RENDER_CHUNK_PX = 2048  # level-0 columns rendered per numpy pass (bounds working memory)
SMALLEST_LEVEL_PX = 512  # the pyramid stops once a level's longer side is at most this
JPEG_QUALITY = 90

# Optical density per unit concentration (rows of skimage.color.rgb_from_hed, normalised).
_OD_HAEMATOXYLIN = np.array([0.65, 0.70, 0.29], np.float32)
_OD_DAB = np.array([0.27, 0.57, 0.78], np.float32)
_OD_HAEMATOXYLIN /= np.linalg.norm(_OD_HAEMATOXYLIN)
_OD_DAB /= np.linalg.norm(_OD_DAB)
_OD_BLOOD = np.array([0.08, 0.95, 0.80], np.float32)
_OD_PEN = {
    "green": np.array([1.10, 0.25, 0.85], np.float32),
    "blue": np.array([1.00, 0.55, 0.10], np.float32),
    "black": np.array([1.10, 1.10, 1.10], np.float32),
}
_OD_BUBBLE_EDGE = np.array([0.35, 0.35, 0.33], np.float32)
_GLASS_RGB = np.array([243.0, 242.0, 240.0], np.float32)

CELL_NONE, CELL_STROMA, CELL_TUMOUR, CELL_LYMPHOCYTE = 0, 1, 2, 3
_TEXTURE_PX = 509  # prime, so the noise texture never lines up with tiles

# HER2 membrane staining per class: (intensity, fraction of membrane edges stained, half-width px)
HER2_MEMBRANE = {0: (0.0, 0.0, 1.3), 1: (0.45, 0.40, 1.3), 2: (0.65, 0.97, 1.3), 3: (1.1, 1.0, 1.6)}


RenderStrip = Callable[[int, int], np.ndarray]  # (y0_level0, rows) -> (rows, width, 3) uint8


class SyntheticError(ValueError):
    """Refused synthetic-cohort parameters; the message names the argument."""


# -- hashing: per-cell randomness from global indices, independent of rendering order ------------------


def _mix64(value: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    value = value ^ (value >> np.uint64(30))
    value = value * np.uint64(0xBF58476D1CE4E5B9)
    value = value ^ (value >> np.uint64(27))
    value = value * np.uint64(0x94D049BB133111EB)
    return value ^ (value >> np.uint64(31))


def _hash_uniform(key: np.ndarray, salt: int) -> np.ndarray:
    """Uniform [0, 1) float32 from uint64 keys and a salt."""
    with np.errstate(over="ignore"):
        mixed = _mix64(key ^ np.uint64((salt * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF))
    return ((mixed >> np.uint64(40)).astype(np.float32)) * np.float32(1.0 / (1 << 24))


def _cell_key(seed: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        base = _mix64(np.asarray([seed & 0xFFFFFFFFFFFFFFFF], np.uint64))[0]
        return base ^ (rows.astype(np.uint64) << np.uint64(32)) ^ cols.astype(np.uint64)


# -- layout -----------------------------------------------------------------------------------------------


@dataclass
class Discs:
    """Small round objects (debris specks, red blood cells) in level-0 px, sorted by y for region queries."""

    x: np.ndarray
    y: np.ndarray
    radius: np.ndarray
    strength: np.ndarray

    @classmethod
    def empty(cls) -> Discs:
        return cls(*(np.zeros(0, np.float32) for _ in range(4)))

    @classmethod
    def sorted_by_y(cls, x: np.ndarray, y: np.ndarray, radius: np.ndarray, strength: np.ndarray) -> Discs:
        order = np.argsort(y, kind="stable")
        return cls(*(np.asarray(a, np.float32)[order] for a in (x, y, radius, strength)))

    def in_box(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        margin = float(self.radius.max()) + 2 if len(self.radius) else 0.0
        lo, hi = np.searchsorted(self.y, [y0 - margin, y1 + margin])
        index = np.arange(lo, hi)
        return index[(self.x[index] > x0 - margin) & (self.x[index] < x1 + margin)]


@dataclass
class Stroke:
    """A polyline of width ``half_width_px`` (pen stroke or tissue fold), level-0 px."""

    points: np.ndarray  # (n, 2) x, y
    half_width_px: float
    kind: str  # "pen:green", "pen:blue", "pen:black", "fold"

    def bbox(self) -> tuple[float, float, float, float]:
        pad = self.half_width_px + 2
        return (
            float(self.points[:, 0].min() - pad),
            float(self.points[:, 1].min() - pad),
            float(self.points[:, 0].max() + pad),
            float(self.points[:, 1].max() + pad),
        )


@dataclass
class SlideLayout:
    """Everything needed to render any region of one synthetic slide."""

    task: str
    label: int
    seed: int
    width_level0_px: int
    height_level0_px: int
    params: dict[str, float]
    tissue_field: np.ndarray  # (ceil(h/32), ceil(w/32)) float32, node (r, c) at level 0 ((c+.5)*32, (r+.5)*32)
    tumour_field: np.ndarray
    lymph_field: np.ndarray
    thresholds: dict[str, float]
    debris: Discs
    blood: Discs
    bubbles: np.ndarray  # (n, 3): x, y, radius
    strokes: list[Stroke]
    texture: np.ndarray = field(repr=False)  # (2, 509, 509) float32 standard normal
    _texture_wrapped: np.ndarray | None = field(default=None, repr=False)  # texture tiled for slicing

    def __post_init__(self) -> None:
        # Tiled once so a render chunk's texture is a slice (no gather per pixel).
        reps_y = -(-(_TEXTURE_PX + TILE_PX + 2 * CELL_PX) // _TEXTURE_PX)
        reps_x = -(-(_TEXTURE_PX + RENDER_CHUNK_PX + 2 * CELL_PX) // _TEXTURE_PX)
        self._texture_wrapped = np.tile(self.texture, (1, reps_y, reps_x))

    def tumour_mask(self) -> np.ndarray:
        """(ceil(h/32), ceil(w/32)) bool: tumour at 1/32 of level 0, the same fields that place tumour cells."""
        return (self.tissue_field > self.thresholds["tissue"]) & (self.tumour_field > self.thresholds["tumour"])

    def tissue_mask(self) -> np.ndarray:
        return self.tissue_field > self.thresholds["tissue"]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return (noise - noise.mean()) / (noise.std() + 1e-6)


def _upsample(coarse: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    rows = np.linspace(0, coarse.shape[0] - 1, shape[0], dtype=np.float32)
    cols = np.linspace(0, coarse.shape[1] - 1, shape[1], dtype=np.float32)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    return ndimage.map_coordinates(coarse, [rr, cc], order=3, mode="nearest").astype(np.float32)


def _quantile_threshold(values: np.ndarray, keep_fraction: float) -> float:
    if values.size == 0:
        return float("inf")
    return float(np.quantile(values, 1.0 - keep_fraction))


def make_layout(task: str, label: int, seed: int, width_level0_px: int, height_level0_px: int) -> SlideLayout:
    """Draw the slide-level parameters and object lists from ``seed`` (all randomness of the slide)."""
    _check_task_label(task, label)
    rng = np.random.default_rng([seed, 0x5EED])
    w, h = width_level0_px, height_level0_px
    grid_shape = (math.ceil(h / FIELD_PX), math.ceil(w / FIELD_PX))
    area_mp = w * h / 1e6

    params: dict[str, float] = {
        "tissue_fraction": rng.uniform(0.35, 0.6),
        "tumour_fraction": rng.uniform(0.15, 0.55),  # of tissue
        "lymph_fraction": rng.uniform(0.0, 0.2),  # of non-tumour tissue
        "stroma_cellularity": rng.uniform(0.15, 0.45),
        "nest_sigma_field_px": rng.uniform(3.5, 7.0),  # tumour nests ~ 300-600 level-0 px across
        "haematoxylin_gain": rng.uniform(0.75, 1.25),
        "dab_gain": rng.uniform(0.9, 1.1),
        "debris_level": rng.uniform(0.0, 1.0),
        # Tumour nuclei size per slide: how much nuclear colour a tumour shows at low power, whatever the label.
        "tumour_nucleus_scale": rng.uniform(0.75, 1.15),
        "cytoplasm_blush": 0.0,
        "tumour_cytoplasm_h": 0.16,
        "tumour_nuclear_dab": 0.0,
        "normal_nuclear_dab": 0.0,
    }
    if task == "her2":
        # Diffuse, non-specific cytoplasmic DAB: brown at the thumbnail, smooth (no rings) at high power.
        params["cytoplasm_blush"] = rng.uniform(0.0, 0.45)
        intensity, completeness, half_width = HER2_MEMBRANE[label]
        params["membrane_dab"] = intensity * rng.uniform(0.95, 1.05)
        params["membrane_completeness"] = completeness
        params["membrane_half_width_px"] = half_width
    else:
        # Diffuse cytoplasmic DAB makes a "loss" tumour look as brown as an "intact" one at low power,
        # while its nuclei stay blue at high power.
        params["cytoplasm_blush"] = rng.uniform(0.0, 0.5)
        params["normal_nuclear_dab"] = rng.uniform(0.5, 0.9)
        params["tumour_nuclear_dab"] = rng.uniform(0.4, 0.95) if label == 0 else rng.uniform(0.0, 0.04)
        # Counterstain of tumour cytoplasm varies per slide, so low-power blueness says nothing of the nuclei.
        params["tumour_cytoplasm_h"] = rng.uniform(0.08, 0.3)
        params["membrane_dab"] = 0.0
        params["membrane_completeness"] = 0.0
        params["membrane_half_width_px"] = 1.0

    # Tissue: a few large bumps plus low-frequency noise, kept off the slide's edges.
    rows = (np.arange(grid_shape[0], dtype=np.float32) + 0.5) / grid_shape[0]
    cols = (np.arange(grid_shape[1], dtype=np.float32) + 0.5) / grid_shape[1]
    ry, rx = np.meshgrid(rows, cols, indexing="ij")
    tissue = 0.7 * _upsample(_smooth_noise(rng, (24, 24), 2.0), grid_shape)
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0.25, 0.75, size=2)
        sy, sx = rng.uniform(0.12, 0.3, size=2)
        tissue += np.exp(-0.5 * (((ry - cy) / sy) ** 2 + ((rx - cx) / sx) ** 2))
    edge = np.minimum(np.minimum(ry, 1 - ry), np.minimum(rx, 1 - rx))
    tissue -= 3.0 * np.clip(0.08 - edge, 0, None) / 0.08
    tissue = tissue.astype(np.float32)
    tissue_threshold = _quantile_threshold(tissue.ravel(), params["tissue_fraction"])
    in_tissue = tissue > tissue_threshold

    tumour = _smooth_noise(rng, grid_shape, params["nest_sigma_field_px"]).astype(np.float32)
    tumour_threshold = _quantile_threshold(tumour[in_tissue], params["tumour_fraction"])
    lymph = _smooth_noise(rng, grid_shape, 2.0).astype(np.float32)
    non_tumour_tissue = in_tissue & (tumour <= tumour_threshold)
    lymph_threshold = _quantile_threshold(lymph[non_tumour_tissue], params["lymph_fraction"])
    if params["lymph_fraction"] <= 0.005:
        lymph_threshold = float("inf")

    tumour_mask = in_tissue & (tumour > tumour_threshold)

    def outside_tumour(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        r = np.clip((y // FIELD_PX).astype(int), 0, grid_shape[0] - 1)
        c = np.clip((x // FIELD_PX).astype(int), 0, grid_shape[1] - 1)
        return ~tumour_mask[r, c]

    # Brown debris: clusters of DAB-like specks anywhere but in tumour; amount random per slide.
    n_clusters = rng.poisson(params["debris_level"] * 3.0 * area_mp)
    xs, ys, rs, ss = [], [], [], []
    for _ in range(n_clusters):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        n = 1 + rng.poisson(40)
        spread = rng.uniform(40, 220)
        x = cx + rng.normal(0, spread, n)
        y = cy + rng.normal(0, spread, n)
        keep = (x >= 0) & (x < w) & (y >= 0) & (y < h)
        keep[keep] &= outside_tumour(x[keep], y[keep])
        xs.append(x[keep])
        ys.append(y[keep])
        rs.append(rng.uniform(1.5, 5.5, keep.sum()))
        ss.append(rng.uniform(0.6, 1.6, keep.sum()))
    debris = Discs.sorted_by_y(*(np.concatenate(a) if a else np.zeros(0) for a in (xs, ys, rs, ss)))

    # Blood: patches of red blood cells.
    xs, ys = [], []
    for _ in range(rng.poisson(0.12 * area_mp)):
        cx, cy = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.1 * h, 0.9 * h)
        n = int(rng.integers(80, 600))
        spread = rng.uniform(40, 160)
        xs.append(cx + rng.normal(0, spread, n))
        ys.append(cy + rng.normal(0, spread, n))
    if xs:
        x, y = np.concatenate(xs), np.concatenate(ys)
        blood = Discs.sorted_by_y(x, y, rng.uniform(3.0, 4.0, x.size), rng.uniform(0.5, 0.9, x.size))
    else:
        blood = Discs.empty()

    n_bubbles = rng.poisson(0.06 * area_mp)
    bubbles = np.stack(
        [rng.uniform(0, w, n_bubbles), rng.uniform(0, h, n_bubbles), rng.uniform(60, 400, n_bubbles)], axis=1
    ).astype(np.float32)

    strokes: list[Stroke] = []
    scale = max(w, h)
    for _ in range(rng.binomial(2, 0.35)):  # pen marks: a meandering line near one edge
        n = int(rng.integers(12, 40))
        start = np.array([rng.uniform(0.05, 0.95) * w, rng.choice([0.05, 0.95]) * h])
        heading = rng.uniform(0, 2 * np.pi)
        angles = heading + np.cumsum(rng.normal(0, 0.25, n))
        step = scale / 60
        points = start + np.cumsum(np.stack([np.cos(angles), np.sin(angles)], 1) * step, axis=0)
        colour = str(rng.choice(list(_OD_PEN)))
        strokes.append(Stroke(points.astype(np.float32), float(rng.uniform(6, 18)), f"pen:{colour}"))
    for _ in range(rng.binomial(2, 0.4)):  # tissue folds: a straight band over tissue
        tissue_rc = np.argwhere(in_tissue)
        if len(tissue_rc) == 0:
            break
        r, c = tissue_rc[rng.integers(len(tissue_rc))]
        centre = np.array([(c + 0.5) * FIELD_PX, (r + 0.5) * FIELD_PX])
        angle = rng.uniform(0, np.pi)
        half_length = rng.uniform(0.08, 0.25) * scale
        direction = np.array([np.cos(angle), np.sin(angle)])
        points = np.stack([centre - half_length * direction, centre + half_length * direction]).astype(np.float32)
        strokes.append(Stroke(points, float(rng.uniform(20, 70)), "fold"))

    texture = rng.standard_normal((2, _TEXTURE_PX, _TEXTURE_PX)).astype(np.float32)
    return SlideLayout(
        task=task,
        label=label,
        seed=seed,
        width_level0_px=w,
        height_level0_px=h,
        params={k: float(v) for k, v in params.items()},
        tissue_field=tissue,
        tumour_field=tumour,
        lymph_field=lymph,
        thresholds={"tissue": tissue_threshold, "tumour": tumour_threshold, "lymph": lymph_threshold},
        debris=debris,
        blood=blood,
        bubbles=bubbles,
        strokes=strokes,
        texture=texture,
    )


# -- rendering --------------------------------------------------------------------------------------------


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


# -- pyramid writing --------------------------------------------------------------------------------------


def _level_dimensions(width: int, height: int) -> list[tuple[int, int]]:
    dims = [(width, height)]
    while max(dims[-1]) > SMALLEST_LEVEL_PX and min(dims[-1]) >= 2:
        w, h = dims[-1]
        dims.append((w // 2, h // 2))
    return dims


def _downsample2(strip: np.ndarray) -> np.ndarray:
    h, w = strip.shape[0] // 2 * 2, strip.shape[1] // 2 * 2
    s = strip[:h, :w].astype(np.uint16)
    mean = (s[0::2, 0::2] + s[1::2, 0::2] + s[0::2, 1::2] + s[1::2, 1::2] + 2) // 4
    return mean.astype(np.uint8)


def _strip_tiles(strip: np.ndarray, tile_px: int) -> Iterator[np.ndarray]:
    for x in range(0, strip.shape[1], tile_px):
        yield strip[:, x : x + tile_px]


def _level_tiles(
    w: int, h: int, render_strip: RenderStrip, source: Path | None, sink: Path | None, progress: tqdm | None
) -> Iterator[np.ndarray]:
    """Tiles of one level in row-major order, one strip of TILE_PX rows at a time.

    Level 0 strips are rendered; a reduced level's strips are read from ``source`` (the previous
    level's 2x means). Each strip's own 2x mean is appended to ``sink`` for the next level.
    """
    with open(source, "rb") if source else _nothing() as reader, open(sink, "wb") if sink else _nothing() as writer:
        for y in range(0, h, TILE_PX):
            rows = min(TILE_PX, h - y)
            if reader is None:
                strip = render_strip(y, rows)
            else:
                strip = np.frombuffer(reader.read(rows * w * 3), np.uint8).reshape(rows, w, 3)
            if writer is not None:
                writer.write(_downsample2(strip).tobytes())
            yield from _strip_tiles(strip, TILE_PX)
            if progress is not None:
                progress.update(rows * w)


def _aperio_description(width: int, height: int, mpp: float, objective_power: float, note: str) -> str:
    # OpenSlide's aperio driver reads AppMag and MPP from this; the rest of the file is a plain pyramid.
    return (
        f"Aperio Image Library (dual-attention synthetic slide)\r\n{width}x{height} ({TILE_PX}x{TILE_PX}) "
        f"JPEG/RGB Q={JPEG_QUALITY}|AppMag = {objective_power:g}|MPP = {mpp:.4f}|{note}"
    )


def write_pyramid(
    path: str | Path,
    width_level0_px: int,
    height_level0_px: int,
    render_strip: RenderStrip,
    mpp: float = MPP_40X,
    objective_power: float | None = OBJECTIVE_POWER,
    note: str = "",
    progress: tqdm | None = None,
) -> list[tuple[int, int]]:
    """Stream a power-of-two JPEG pyramid to ``path``; ``render_strip(y0, rows) -> (rows, W, 3) uint8``.

    Each level is its own tiled page in the main IFD chain, largest first, reduced levels marked
    ``subfiletype=1`` (what OpenSlide needs). Level k+1 is the 2x box-mean of level k, passed on through
    a temporary file one strip at a time. ``objective_power`` set: an Aperio-style ImageDescription
    carries AppMag and MPP, so OpenSlide reports ``openslide.objective-power`` (its generic-tiff driver
    never does); ``None``: a plain generic TIFF (mpp from the resolution tags only).
    """
    path = Path(path)
    dims = _level_dimensions(width_level0_px, height_level0_px)
    bigtiff = width_level0_px * height_level0_px * 3 > 2**31
    with (
        tempfile.TemporaryDirectory(dir=path.parent, prefix=".pyramid-") as scratch,
        tifffile.TiffWriter(path, bigtiff=bigtiff) as tif,
    ):
        source_file: Path | None = None
        for level, (w, h) in enumerate(dims):
            sink_file = Path(scratch) / f"level{level + 1}.raw" if level + 1 < len(dims) else None

            resolution = 1e4 / (mpp * (width_level0_px / w))  # pixels per centimetre at this level
            tif.write(
                _level_tiles(w, h, render_strip, source_file, sink_file, progress),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(TILE_PX, TILE_PX),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": JPEG_QUALITY},
                subfiletype=0 if level == 0 else 1,
                resolution=(resolution, resolution),
                resolutionunit="CENTIMETER",
                description=(
                    _aperio_description(w, h, mpp, objective_power, note)
                    if objective_power is not None and level == 0
                    else (note or None) if level == 0 else None
                ),
                metadata=None,
                software="dual-attention synthetic",
            )
            source_file = sink_file
    return dims


# -- one slide, one cohort --------------------------------------------------------------------------------


def write_synthetic_slide(
    path: str | Path,
    task: str,
    label: int,
    seed: int,
    width_level0_px: int = 4096,
    height_level0_px: int = 4096,
    mask_path: str | Path | None = None,
    objective_power: float | None = OBJECTIVE_POWER,
    progress: bool = False,
) -> dict[str, Any]:
    """Write one synthetic slide (and its tumour mask PNG at 1/32 when ``mask_path`` is given).

    Returns a dict describing it: path, task, label, seed, width/height_level0_px, mpp, level
    dimensions, tumour_mask_path, tumour_fraction (of the slide area), and the slide-level parameters.
    """
    _check_task_label(task, label)
    for name, value in (("width_level0_px", width_level0_px), ("height_level0_px", height_level0_px)):
        if not isinstance(value, int | np.integer) or value < 2 * CELL_PX:
            raise SyntheticError(f"{name} must be an integer >= {2 * CELL_PX}, got {value!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layout = make_layout(task, label, seed, width_level0_px, height_level0_px)

    def render_strip(y0: int, rows: int) -> np.ndarray:
        strip = np.empty((rows, width_level0_px, 3), np.uint8)
        for x0 in range(0, width_level0_px, RENDER_CHUNK_PX):
            cols = min(RENDER_CHUNK_PX, width_level0_px - x0)
            strip[:, x0 : x0 + cols] = render_region(layout, x0, y0, cols, rows)
        return strip

    bar = tqdm(total=_pyramid_pixels(width_level0_px, height_level0_px), unit="px", unit_scale=True,
               desc=path.name, disable=not progress, leave=False)
    note = f"task={task}|label={label}|seed={seed}"
    with bar:
        dims = write_pyramid(path, width_level0_px, height_level0_px, render_strip,
                             objective_power=objective_power, note=note, progress=bar)
    tumour_mask = layout.tumour_mask()
    if mask_path is not None:
        mask_path = Path(mask_path)
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((tumour_mask * 255).astype(np.uint8)).save(mask_path)
    return {
        "path": str(path),
        "task": task,
        "label": int(label),
        "seed": int(seed),
        "width_level0_px": int(width_level0_px),
        "height_level0_px": int(height_level0_px),
        "mpp": MPP_40X,
        "level_dimensions": dims,
        "tumour_mask_path": str(mask_path) if mask_path is not None else None,
        "tumour_mask_downsample": FIELD_PX,
        "tumour_fraction": float(tumour_mask.mean()),
        "params": layout.params,
    }


def _pyramid_pixels(width: int, height: int) -> int:
    return sum(w * h for w, h in _level_dimensions(width, height))


def _check_task_label(task: str, label: int) -> None:
    if task not in NUM_CLASSES:
        raise SyntheticError(f"task must be one of {tuple(NUM_CLASSES)}, got {task!r}")
    if not (isinstance(label, int | np.integer) and 0 <= label < NUM_CLASSES[task]):
        raise SyntheticError(f"label for task '{task}' must be an integer in 0..{NUM_CLASSES[task] - 1}, got {label!r}")


def slide_seed(cohort_seed: int, index: int) -> int:
    """The seed of slide ``index`` of a cohort (63-bit, recorded in the manifest)."""
    return int(np.random.SeedSequence([cohort_seed, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def plan_cohort(task: str, n_slides: int, seed: int, n_folds: int) -> list[tuple[str, int, int, int]]:
    """(slide_id, label, fold, slide_seed) per slide: labels balanced, folds stratified by label."""
    if task not in NUM_CLASSES:
        raise SyntheticError(f"task must be one of {tuple(NUM_CLASSES)}, got {task!r}")
    n_classes = NUM_CLASSES[task]
    if n_slides < 1:
        raise SyntheticError(f"n_slides must be >= 1, got {n_slides}")
    if n_folds < 1:
        raise SyntheticError(f"n_folds must be >= 1, got {n_folds}")
    rng = np.random.default_rng([seed, 0xC0407])
    labels = rng.permutation(np.arange(n_slides) % n_classes)
    folds = np.zeros(n_slides, np.int64)
    # Deal each class's slides round-robin over folds, continuing where the previous class stopped,
    # so fold sizes differ by at most one and each fold sees every class when there are enough slides.
    next_fold = 0
    for c in range(n_classes):
        for i in np.flatnonzero(labels == c):
            folds[i] = next_fold
            next_fold = (next_fold + 1) % n_folds
    width = len(str(n_slides - 1))
    return [
        (f"{task}-{seed}-{i:0{width}d}", int(labels[i]), int(folds[i]), slide_seed(seed, i)) for i in range(n_slides)
    ]


def _write_one(job: tuple[str, str, int, int, int, str, int, float | None]) -> dict[str, Any]:
    """One cohort slide (a picklable job for the process pool)."""
    out_dir, task, label, fold, seed, slide_id, size, objective_power = job
    info = write_synthetic_slide(
        Path(out_dir) / "slides" / f"{slide_id}.tiff",
        task,
        label,
        seed,
        size,
        size,
        mask_path=Path(out_dir) / "masks" / f"{slide_id}_tumour.png",
        objective_power=objective_power,
    )
    info.update(slide_id=slide_id, fold=fold)
    return info


def write_cohort(
    out_dir: str | Path,
    task: str,
    n_slides: int,
    seed: int,
    slide_level0_px: int = 4096,
    n_folds: int = 4,
    workers: int | None = None,
    objective_power: float | None = OBJECTIVE_POWER,
    progress: bool = True,
) -> Path:
    """Write ``n_slides`` slides to ``out_dir/slides/*.tiff``, tumour masks (1/32, PNG) to
    ``out_dir/masks/``, and ``out_dir/manifest.parquet`` (paths relative to ``out_dir``); return the
    manifest path. Labels are balanced, folds stratified; pixels depend only on ``seed``.
    """
    out_dir = Path(out_dir)
    plan = plan_cohort(task, n_slides, seed, n_folds)
    if not isinstance(slide_level0_px, int) or slide_level0_px < 2 * CELL_PX:
        raise SyntheticError(f"slide_level0_px must be an integer >= {2 * CELL_PX}, got {slide_level0_px!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    workers = workers or min(2, os.cpu_count() or 1, n_slides)
    jobs = [(str(out_dir), task, lab, fold, s, sid, slide_level0_px, objective_power) for sid, lab, fold, s in plan]
    infos: list[dict[str, Any]] = []
    bar = tqdm(total=len(jobs), desc=f"synth {task}", unit="slide", disable=not progress)
    with bar:
        if workers <= 1:
            for job in jobs:
                infos.append(_write_one(job))
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for info in pool.map(_write_one, jobs):
                    infos.append(info)
                    bar.update()
    rows = [
        ManifestRow(
            slide_id=info["slide_id"],
            path=os.path.relpath(info["path"], out_dir),
            label=info["label"],
            task=task,
            fold=info["fold"],
            seed=info["seed"],
            tumour_mask_path=os.path.relpath(info["tumour_mask_path"], out_dir),
            width_level0_px=info["width_level0_px"],
            height_level0_px=info["height_level0_px"],
            mpp=info["mpp"],
        )
        for info in infos
    ]
    return write_manifest(rows, out_dir / "manifest.parquet")


# -- command line -----------------------------------------------------------------------------------------


def cohort_summary(manifest_path: str | Path) -> str:
    """Counts per label and fold, and the size on disk, as printable text."""
    from dual_attention.manifest import read_manifest

    table = read_manifest(manifest_path).to_pylist()
    task = table[0]["task"]
    names = CLASS_NAMES[task]
    folds = sorted({r["fold"] for r in table})
    lines = [f"cohort {Path(manifest_path).parent} ({task}, {len(table)} slides)"]
    header = "label".ljust(10) + "".join(f"fold {f}".rjust(8) for f in folds) + "total".rjust(8)
    lines.append(header)
    for label, name in enumerate(names):
        counts = [sum(1 for r in table if r["label"] == label and r["fold"] == f) for f in folds]
        lines.append(f"{label} ({name})".ljust(10) + "".join(f"{c:8d}" for c in counts) + f"{sum(counts):8d}")
    files = [Path(r["path"]) for r in table] + [Path(r["tumour_mask_path"]) for r in table if r.get("tumour_mask_path")]
    size = sum(f.stat().st_size for f in files if f.exists()) + Path(manifest_path).stat().st_size
    lines.append(f"size on disk: {size / 2**20:.1f} MiB; manifest: {manifest_path}")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m dual_attention.synthetic",
        description="Write a synthetic IHC cohort: pyramidal JPEG TIFF slides (40x, 0.25 um/px), "
        "tumour masks at 1/32 and a Parquet manifest.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--task", required=True, choices=tuple(NUM_CLASSES))
    parser.add_argument("--n-slides", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size-level0-px", type=int, default=4096, help="side of each square slide at level 0")
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: min(2, cores))")
    parser.add_argument(
        "--plain-tiff",
        action="store_true",
        help="write a generic TIFF (no Aperio-style description: OpenSlide then reports no objective power)",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        manifest = write_cohort(
            args.out,
            args.task,
            args.n_slides,
            args.seed,
            slide_level0_px=args.size_level0_px,
            n_folds=args.folds,
            workers=args.workers,
            objective_power=None if args.plain_tiff else OBJECTIVE_POWER,
        )
    except SyntheticError as error:
        parser.error(str(error))
    print(cohort_summary(manifest))
    print(f"written in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
