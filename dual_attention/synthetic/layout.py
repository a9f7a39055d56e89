"""A synthetic slide's layout: everything needed to render any region of it, drawn from one seed.

Coarse fields at 1/32 of level 0 say where tissue, tumour and lymphocyte aggregates are; cells sit on a
jittered 16-px grid whose jitter and attributes come from an integer hash of the cell's global index, so any
level-0 region can be rendered on its own, in any order, with identical pixels; sparse objects (debris,
blood, bubbles, pen strokes) are short lists in level-0 coordinates. See the package docstring for the labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from dual_attention.config import NUM_CLASSES

MPP_40X = 0.25  # micrometres per level-0 pixel at 40x
OBJECTIVE_POWER = 40
CELL_PX = 16  # cell grid pitch at level 0: tumour cells ~16 px across, nuclei 8-11 px
FIELD_PX = 32  # coarse layout fields (tissue, tumour, lymphocytes) are sampled every 32 level-0 px
TILE_PX = 256  # TIFF tile side
RENDER_CHUNK_PX = 2048  # level-0 columns rendered per numpy pass (bounds working memory)
_OD_PEN = {
    "green": np.array([1.10, 0.25, 0.85], np.float32),
    "blue": np.array([1.00, 0.55, 0.10], np.float32),
    "black": np.array([1.10, 1.10, 1.10], np.float32),
}
_TEXTURE_PX = 509  # prime, so the noise texture never lines up with tiles
# HER2 membrane staining per class: (intensity, fraction of membrane edges stained, half-width px)
HER2_MEMBRANE = {0: (0.0, 0.0, 1.3), 1: (0.45, 0.40, 1.3), 2: (0.65, 0.97, 1.3), 3: (1.1, 1.0, 1.6)}


class SyntheticError(ValueError):
    """Refused synthetic-cohort parameters; the message names the argument."""


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


def _check_task_label(task: str, label: int) -> None:
    if task not in NUM_CLASSES:
        raise SyntheticError(f"task must be one of {tuple(NUM_CLASSES)}, got {task!r}")
    if not (isinstance(label, int | np.integer) and 0 <= label < NUM_CLASSES[task]):
        raise SyntheticError(f"label for task '{task}' must be an integer in 0..{NUM_CLASSES[task] - 1}, got {label!r}")
