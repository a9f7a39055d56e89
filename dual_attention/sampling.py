"""Attention map -> a few spatially distinct tile locations on the thumbnail; and the random baseline.

The attention sampler (paper, step 2):

1. min-max normalise the attention map (over tissue) to (0, 1] (``normalise_attention``);
2. mask it: "positive" maps by an adaptive (Otsu) threshold, "tumour" maps by 3-means keeping the
   highest-mean cluster; always inside the tissue mask (``attention_region``);
3. add noise n ~ U[low, high] inside the mask only: F = m·n + m·Â;
4. take the top 2N locations of F, then greedily keep those at least d_t apart, up to N.

Fewer than N locations come back, with ``shortfall_reason`` saying why, when the mask is too small or the
candidates too crowded. Locations are thumbnail (row, col) pixel indices; ``thumb_to_level0_box`` from
``dual_attention.slides`` is the one mapping to level 0.

A map that is flat over tissue (max/min below 1 + ``min_contrast``) is not stretched: it is treated as
constant, so the mask is the whole tissue and the noise alone picks the tiles, which is what a flat map
means (min-max normalisation would turn float noise into a full (0, 1] range and hide it).

The random baseline (``random_locations``) draws N tissue pixels without replacement by Gumbel-top-k
(uniform unless ``log_weights`` are given). Training draws from the attention itself the same way
(``attention_draw``: log-attention as ``log_weights``, top 2N, then d_t apart), because the SAM's
REINFORCE signal is the gradient of the log-probability of tiles drawn from its own distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.filters import threshold_otsu

from dual_attention.config import SamplerConfig
from dual_attention.slides import Level0Box, thumb_to_level0_box

KMEANS_MAX_FIT_PX = 100_000  # k-means on 1-D values: a subsample this large fixes the 3 centres well


@dataclass
class SampledLocations:
    centers_thumb_rc: np.ndarray  # (n, 2) int row, col on the thumbnail, best first
    scores: np.ndarray  # (n,) the ranking score F (or the Gumbel key) of each kept location
    shortfall_reason: str | None  # why fewer than the requested number came back; None if all did


def _check_maps(attention_map: np.ndarray, tissue_mask: np.ndarray) -> None:
    if attention_map.ndim != 2:
        raise ValueError(f"attention_map must be 2-D (h, w), got shape {attention_map.shape}")
    if tissue_mask.shape != attention_map.shape:
        raise ValueError(
            f"tissue_mask shape {tissue_mask.shape} does not match attention_map shape {attention_map.shape}"
        )


def normalise_attention(attention_map: np.ndarray) -> np.ndarray:
    """Min-max normalise to (0, 1]: the minimum maps to a small positive value, not 0, so every pixel of
    the mask keeps a non-zero score; a constant map becomes all ones."""
    return _normalise_in_place(np.array(attention_map, dtype=np.float64))


def _normalise_in_place(values: np.ndarray) -> np.ndarray:
    """``normalise_attention`` overwriting ``values`` (float64): the same arithmetic, no map-sized copies."""
    low, high = float(values.min()), float(values.max())
    return _min_max_in_place(values, low, high - low)


def _min_max_in_place(values: np.ndarray, low: float, span: float) -> np.ndarray:
    """The one min-max arithmetic (float64, in place, element by element): ``values`` may be a whole map or
    any of its pixels, normalised as the whole map would be given its ``low`` and ``span``."""
    if span <= 0 or not np.isfinite(span):
        values[...] = 1.0
        return values
    eps = 1e-6 * span
    values -= low
    values += eps
    values /= span + eps
    return values


def attention_region(normalised: np.ndarray, tissue_mask: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
    """The sampling mask m: high-attention pixels inside tissue.

    ``kind="positive"``: pixels above Otsu's threshold of the attention values inside tissue.
    ``kind="tumour"``: 3-means on those values, keeping the cluster with the highest mean.
    Falls back to the whole tissue mask when the values inside tissue are (nearly) constant.
    """
    _check_maps(normalised, tissue_mask)
    tissue = np.asarray(tissue_mask, dtype=bool)  # no copy of a bool mask: it is only read
    return _region_of_tissue_values(normalised[tissue], tissue, kind, seed)


def _region_of_tissue_values(values: np.ndarray, tissue: np.ndarray, kind: str, seed: int) -> np.ndarray:
    """``attention_region`` from the normalised values of the tissue pixels alone (row-major order)."""
    if values.size == 0:
        return tissue.copy()
    if kind == "positive":
        if _fewer_distinct_than(values, 2):
            return tissue.copy()
        region = np.zeros_like(tissue)
        region[tissue] = values > threshold_otsu(values)
        return region
    if kind == "tumour":
        if _fewer_distinct_than(values, 3):
            return tissue.copy()
        fit_values = values
        if values.size > KMEANS_MAX_FIT_PX:  # large thumbnails: fit on a seeded subsample, assign all
            fit_values = np.random.default_rng(seed).choice(values, KMEANS_MAX_FIT_PX, replace=False)
        from sklearn.cluster import KMeans  # only this mask kind needs it; its import is ~0.8 s

        kmeans = KMeans(n_clusters=3, n_init=3, random_state=seed).fit(fit_values.reshape(-1, 1))
        best = int(np.argmax(kmeans.cluster_centers_[:, 0]))
        region = np.zeros_like(tissue)
        region[tissue] = kmeans.predict(values.reshape(-1, 1)) == best
        return region
    raise ValueError(f"unknown attention mask kind {kind!r}; expected 'positive' or 'tumour'")


def _fewer_distinct_than(values: np.ndarray, count: int) -> bool:
    """Whether ``values`` (1-D) hold fewer than ``count`` (2 or 3) distinct values; as ``np.unique(values).size
    < count`` without sorting a copy of them."""
    low, high = values.min(), values.max()
    if count == 2 or low == high:
        return bool(low == high)
    return not bool(np.any((values > low) & (values < high)))


def greedy_spread(candidates_rc: np.ndarray, min_distance: float, limit: int) -> np.ndarray:
    """Indices of ``candidates_rc`` (ordered best first) kept greedily so that every pair is at least
    ``min_distance`` apart (Euclidean, thumbnail pixels), up to ``limit``."""
    kept: list[int] = []
    for i, point in enumerate(candidates_rc):
        if len(kept) >= limit:
            break
        if kept:
            distances = np.hypot(*(candidates_rc[kept] - point).T)
            if distances.min() < min_distance:
                continue
        kept.append(i)
    return np.asarray(kept, dtype=np.int64)


def sample_locations(
    attention_map: np.ndarray,
    tissue_mask: np.ndarray,
    sampler: SamplerConfig,
    mask_kind: str,
    rng: np.random.Generator,
) -> SampledLocations:
    """The paper's sampler (see the module docstring). ``rng`` draws the noise (and seeds k-means)."""
    _check_maps(attention_map, tissue_mask)
    n_wanted = sampler.n_tiles
    tissue = np.asarray(tissue_mask, dtype=bool)
    # Normalise over tissue: values off tissue (0 for a tissue-masked softmax) must not set the minimum. Only
    # tissue pixels are ever normalised (here, then band by band in ``_top_scores``), in float64 whatever the
    # map's dtype: no map-sized float64 copy (25 MB for a 3.2-GP slide's 1536 x 2048 thumbnail).
    tissue_values = attention_map[tissue].astype(np.float64)
    floor = float(tissue_values.min()) if tissue_values.size else 0.0
    peak = float(tissue_values.max()) if tissue_values.size else 0.0
    # flat (max/min below 1 + min_contrast): do not stretch noise into a range; a span of 0 makes every value 1
    span = peak - floor if peak > floor * (1.0 + sampler.min_contrast) else 0.0
    _min_max_in_place(tissue_values, floor, span)
    kmeans_seed = int(rng.integers(0, 2**31 - 1))
    region = _region_of_tissue_values(tissue_values, tissue, mask_kind, kmeans_seed)
    del tissue_values
    n_region = int(region.sum())
    if n_region == 0:
        return SampledLocations(np.zeros((0, 2), np.int64), np.zeros(0), "no tissue inside the attention mask")
    n_candidates = min(sampler.n_candidates, n_region)
    flat_top, top_scores = _top_scores(attention_map, floor, span, region, rng, sampler.noise_low,
                                       sampler.noise_high, n_candidates)
    candidates = np.stack(np.unravel_index(flat_top, attention_map.shape), axis=1)
    kept = greedy_spread(candidates, sampler.min_distance_thumb_px, n_wanted)
    reason = None
    if kept.size < n_wanted:
        reason = (
            f"only {kept.size} of {n_wanted} locations: the attention mask holds {n_region} thumbnail pixels "
            f"and {n_candidates} candidates gave {kept.size} at least {sampler.min_distance_thumb_px} px apart"
        )
    return SampledLocations(candidates[kept], top_scores[kept], reason)


_BAND_PX = 1 << 18  # map pixels per band of ``_top_scores``


def _top_scores(attention_map: np.ndarray, low: float, span: float, region: np.ndarray, rng: np.random.Generator,
                noise_low: float, noise_high: float, n_candidates: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_candidates`` highest F = n + Â inside ``region`` (flat indices into the map, best first, and
    their F), Â the map min-max normalised by ``low`` and ``span``. The noise is drawn for every pixel in row
    order, a band of rows at a time (the same numbers as one draw of the map's shape), and only the region's
    pixels are normalised, scored and ranked: no map-sized temporaries (a 3.2-GP slide's 1536 x 2048 map
    took 108 MB of them)."""
    height, width = attention_map.shape
    rows_per_band = max(1, _BAND_PX // max(1, width))
    indices, scores = [], []
    for row0 in range(0, height, rows_per_band):
        row1 = min(height, row0 + rows_per_band)
        noise = rng.uniform(noise_low, noise_high, size=(row1 - row0, width)).ravel()
        inside = np.flatnonzero(region[row0:row1])
        if inside.size == 0:
            continue
        band_scores = noise[inside] + _min_max_in_place(attention_map[row0:row1].ravel()[inside].astype(np.float64),
                                                        low, span)
        keep = np.argpartition(-band_scores, min(n_candidates, inside.size) - 1)[:n_candidates]
        indices.append(inside[keep] + row0 * width)
        scores.append(band_scores[keep])
    index, score = np.concatenate(indices), np.concatenate(scores)
    top = np.argpartition(-score, n_candidates - 1)[:n_candidates]
    top = top[np.argsort(-score[top], kind="stable")]
    return index[top], score[top]


def random_locations(
    tissue_mask: np.ndarray,
    n: int,
    rng: np.random.Generator,
    log_weights: np.ndarray | None = None,
    n_candidates: int | None = None,
    min_distance: float = 0.0,
) -> SampledLocations:
    """Random-sampling baseline: ``n`` tissue pixels without replacement by Gumbel-top-k.

    With ``log_weights`` (h, w) the draw is proportional to exp(log_weights) over tissue; otherwise
    uniform over tissue. With ``n_candidates`` the top ``n_candidates`` keys are drawn and then kept
    greedily ``min_distance`` apart, up to ``n`` (the paper's top-2N-then-d_t rule on a random draw).
    """
    tissue = tissue_mask.astype(bool)
    if log_weights is not None:
        _check_maps(np.asarray(log_weights), tissue)
    n_tissue = int(tissue.sum())
    if n_tissue == 0:
        return SampledLocations(np.zeros((0, 2), np.int64), np.zeros(0), "no tissue in the tissue mask")
    gumbel = rng.gumbel(size=tissue.shape)
    keys = gumbel if log_weights is None else gumbel + np.asarray(log_weights, dtype=np.float64)
    keys = np.where(tissue, keys, -np.inf).ravel()
    n_drawn = min(max(n, n_candidates or n), n_tissue)
    top = np.argpartition(-keys, n_drawn - 1)[:n_drawn]
    top = top[np.argsort(-keys[top], kind="stable")]
    candidates = np.stack(np.unravel_index(top, tissue.shape), axis=1)
    kept = greedy_spread(candidates, min_distance, n) if min_distance > 0 else np.arange(min(n, n_drawn))
    reason = None
    if kept.size < n:
        reason = (f"only {kept.size} of {n} locations: the tissue mask holds {n_tissue} pixels and {n_drawn} "
                  f"candidates gave {kept.size} at least {min_distance} px apart")
    return SampledLocations(candidates[kept], keys[top[kept]], reason)


def attention_draw(attention_map: np.ndarray, tissue_mask: np.ndarray, sampler: SamplerConfig,
                   rng: np.random.Generator) -> SampledLocations:
    """Training's draw: N tissue locations from the attention itself, so each tile is a sample of the
    distribution whose log-probability the SAM's REINFORCE term differentiates. Gumbel keys on
    log-attention order every tissue pixel (a draw without replacement); the first ones at least ``d_t``
    apart are kept. (Only the top 2N, as the scoring sampler does, would often leave fewer than N tiles
    once the attention concentrates: its top draws then lie close together.)"""
    _check_maps(attention_map, tissue_mask)
    log_attention = np.log(np.maximum(np.asarray(attention_map, dtype=np.float64), 1e-300))
    return random_locations(tissue_mask, sampler.n_tiles, rng, log_weights=log_attention,
                            n_candidates=int(np.count_nonzero(tissue_mask)),
                            min_distance=sampler.min_distance_thumb_px)


def locations_to_level0_boxes(
    centers_thumb_rc: np.ndarray, downsample: int, tile_level0_px: int, level0_dims: tuple[int, int]
) -> list[Level0Box]:
    """Thumbnail (row, col) centres -> level-0 tiles, by the one mapping in ``dual_attention.slides``."""
    return [
        thumb_to_level0_box((float(r), float(c)), downsample, tile_level0_px, level0_dims)
        for r, c in np.asarray(centers_thumb_rc).reshape(-1, 2)
    ]
