"""The tile sampler: normalisation, masks, noise inside the mask only, spacing, seeding, shortfalls."""

from __future__ import annotations

import numpy as np
import pytest

from dual_attention.config import SamplerConfig
from dual_attention.sampling import (
    attention_draw,
    attention_region,
    greedy_spread,
    locations_to_level0_boxes,
    normalise_attention,
    random_locations,
    sample_locations,
)
from dual_attention.slides import thumb_to_level0_box


def _blob_attention(shape=(40, 50), centres=((10, 12), (30, 35)), width=4.0) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    logits = sum(np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * width**2)) for r, c in centres)
    attention = np.exp(3 * logits)
    return attention / attention.sum()


def test_normalise_attention_lies_in_zero_one_exclusive_inclusive() -> None:
    values = normalise_attention(np.array([[0.2, 0.5], [0.8, 0.2]]))
    assert values.max() == 1.0 and values.min() > 0 and values.min() < 1e-5
    assert np.all(normalise_attention(np.full((3, 3), 0.1)) == 1.0)


def test_positive_region_is_otsu_inside_tissue() -> None:
    attention = normalise_attention(_blob_attention())
    tissue = np.zeros_like(attention, bool)
    tissue[:, :25] = True  # only the first blob is on tissue
    region = attention_region(attention, tissue, "positive")
    assert region.any() and not np.any(region & ~tissue)
    assert region[10, 12] and not region[0, 0]
    assert attention[region].min() > attention[tissue & ~region].max()


def test_tumour_region_keeps_the_highest_of_three_clusters() -> None:
    values = np.zeros((6, 6))
    values[:2] = 0.1
    values[2:4] = 0.5
    values[4:] = 1.0
    tissue = np.ones_like(values, bool)
    tissue[5, :] = False
    region = attention_region(values, tissue, "tumour", seed=0)
    assert np.array_equal(region, (values == 1.0) & tissue)
    with pytest.raises(ValueError, match="unknown attention mask kind"):
        attention_region(values, tissue, "nuclei")


def test_greedy_spread_keeps_order_and_distance() -> None:
    candidates = np.array([[0, 0], [0, 1], [5, 0], [0, 6], [4, 4], [10, 10]])
    kept = greedy_spread(candidates, min_distance=5.0, limit=3)
    assert kept.tolist() == [0, 2, 3]
    assert greedy_spread(candidates, min_distance=5.0, limit=10).tolist() == [0, 2, 3, 5]


@pytest.mark.parametrize("kind", ["positive", "tumour"])
def test_sampled_locations_respect_mask_distance_and_count(kind) -> None:
    attention = _blob_attention(centres=((10, 12), (30, 35), (30, 10)))
    tissue = np.ones_like(attention, bool)
    tissue[:, 45:] = False
    config = SamplerConfig(n_tiles=5, n_candidates=60, min_distance_thumb_px=4.0)
    result = sample_locations(attention, tissue, config, kind, np.random.default_rng(0))
    centres = result.centers_thumb_rc
    assert 1 <= len(centres) <= 5
    kmeans_seed = int(np.random.default_rng(0).integers(0, 2**31 - 1))  # the sampler's first draw
    region = attention_region(normalise_attention(attention), tissue, kind, seed=kmeans_seed)
    assert region.sum() < tissue.sum()
    assert np.all(tissue[centres[:, 0], centres[:, 1]])
    assert np.all(region[centres[:, 0], centres[:, 1]])
    distances = np.hypot(*(centres[:, None] - centres[None]).transpose(2, 0, 1))
    assert np.all(distances[~np.eye(len(centres), dtype=bool)] >= 4.0)
    assert np.all(np.diff(result.scores) <= 0), "kept locations come best first"
    assert (result.shortfall_reason is None) == (len(centres) == 5)


def test_noise_is_added_inside_the_mask_only() -> None:
    attention = _blob_attention()
    tissue = np.zeros_like(attention, bool)
    tissue[5:15, 5:20] = True
    config = SamplerConfig(n_tiles=30, n_candidates=150, min_distance_thumb_px=0.0, noise_low=-2.0, noise_high=1.0)
    for seed in range(5):
        result = sample_locations(attention, tissue, config, "positive", np.random.default_rng(seed))
        assert np.all(tissue[result.centers_thumb_rc[:, 0], result.centers_thumb_rc[:, 1]])
        # scores are Â + n with Â in (0, 1] and n in [low, high)
        assert np.all(result.scores > -2.0) and np.all(result.scores < 2.0)


def test_sampler_is_seeded() -> None:
    attention = _blob_attention()
    tissue = np.ones_like(attention, bool)
    config = SamplerConfig(n_tiles=4, n_candidates=8, min_distance_thumb_px=3.0)
    a = sample_locations(attention, tissue, config, "positive", np.random.default_rng(7))
    b = sample_locations(attention, tissue, config, "positive", np.random.default_rng(7))
    c = sample_locations(attention, tissue, config, "positive", np.random.default_rng(8))
    assert np.array_equal(a.centers_thumb_rc, b.centers_thumb_rc)
    assert not np.array_equal(a.centers_thumb_rc, c.centers_thumb_rc)


def test_scarce_tissue_gives_fewer_locations_with_a_reason() -> None:
    attention = _blob_attention()
    tissue = np.zeros_like(attention, bool)
    tissue[10:12, 10:13] = True  # 6 pixels, all within 3 px of each other
    config = SamplerConfig(n_tiles=4, n_candidates=8, min_distance_thumb_px=5.0)
    result = sample_locations(attention, tissue, config, "positive", np.random.default_rng(0))
    assert len(result.centers_thumb_rc) == 1
    assert "only 1 of 4" in result.shortfall_reason
    empty = sample_locations(attention, np.zeros_like(tissue), config, "positive", np.random.default_rng(0))
    assert len(empty.centers_thumb_rc) == 0 and "no tissue" in empty.shortfall_reason


def test_sampler_refuses_mismatched_masks() -> None:
    with pytest.raises(ValueError, match="tissue_mask shape"):
        sample_locations(np.ones((4, 4)), np.ones((4, 5), bool), SamplerConfig(), "positive", np.random.default_rng())


def test_random_baseline_draws_distinct_tissue_pixels_seeded() -> None:
    tissue = np.zeros((20, 20), bool)
    tissue[5:10, 5:10] = True
    a = random_locations(tissue, 10, np.random.default_rng(1))
    b = random_locations(tissue, 10, np.random.default_rng(1))
    assert np.array_equal(a.centers_thumb_rc, b.centers_thumb_rc)
    assert len({tuple(p) for p in a.centers_thumb_rc}) == 10, "without replacement"
    assert np.all(tissue[a.centers_thumb_rc[:, 0], a.centers_thumb_rc[:, 1]])
    assert a.shortfall_reason is None
    scarce = random_locations(tissue, 40, np.random.default_rng(1))
    assert len(scarce.centers_thumb_rc) == 25 and "only 25 of 40" in scarce.shortfall_reason


def test_random_baseline_is_roughly_uniform_over_tissue() -> None:
    tissue = np.zeros((10, 10), bool)
    tissue[:, :4] = True
    counts = np.zeros((10, 10))
    rng = np.random.default_rng(0)
    for _ in range(500):
        picked = random_locations(tissue, 4, rng).centers_thumb_rc
        counts[picked[:, 0], picked[:, 1]] += 1
    per_pixel = counts[tissue]
    assert per_pixel.sum() == 2000 and counts[~tissue].sum() == 0
    assert per_pixel.min() > 25 and per_pixel.max() < 75  # expected 50 each


def test_random_baseline_follows_log_weights() -> None:
    tissue = np.ones((1, 2), bool)
    log_weights = np.log(np.array([[0.9, 0.1]]))
    rng = np.random.default_rng(0)
    first = [tuple(random_locations(tissue, 1, rng, log_weights).centers_thumb_rc[0]) for _ in range(2000)]
    assert 0.85 < first.count((0, 0)) / 2000 < 0.95


def test_locations_map_to_level0_boxes_by_the_slides_mapping() -> None:
    centres = np.array([[0, 0], [10, 20], [31, 31]])
    boxes = locations_to_level0_boxes(centres, downsample=32, tile_level0_px=256, level0_dims=(1024, 1024))
    assert boxes == [thumb_to_level0_box((float(r), float(c)), 32, 256, (1024, 1024)) for r, c in centres]
    assert all(0 <= b.x0 <= 1024 - 256 and 0 <= b.y0 <= 1024 - 256 for b in boxes)


def test_tumour_region_on_a_large_map_fits_on_a_subsample() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.1, 0.01, 150_000), rng.normal(0.5, 0.01, 50_000),
                             rng.normal(0.9, 0.01, 40_000)]).reshape(400, 600)
    region = attention_region(values, np.ones_like(values, bool), "tumour", seed=0)
    assert np.array_equal(region, values > 0.7)


def test_a_flat_map_is_not_stretched_into_a_range() -> None:
    """Float noise on a flat map (max/min below 1 + min_contrast) must not pick the same tiles every time:
    the mask is the whole tissue and the noise decides, as for a constant map."""
    tissue = np.ones((32, 32), bool)
    flat = np.full((32, 32), 1 / 1024) * (1 + 1e-5 * np.random.default_rng(0).standard_normal((32, 32)))
    config = SamplerConfig(n_tiles=4, n_candidates=8, min_distance_thumb_px=3.0)
    picks = [tuple(map(tuple, sample_locations(flat, tissue, config, "positive", np.random.default_rng(s))
                   .centers_thumb_rc)) for s in range(5)]
    assert len(set(picks)) == 5  # different seeds, different tiles: the noise decides
    peaked = flat.copy()
    peaked[10:14, 10:14] *= 3.0  # contrast well above min_contrast: the map decides
    for s in range(5):
        centers = sample_locations(peaked, tissue, config, "positive", np.random.default_rng(s)).centers_thumb_rc
        assert all(10 <= r < 14 and 10 <= c < 14 for r, c in centers[:1])


def test_attention_draw_follows_the_attention_and_keeps_tiles_apart() -> None:
    tissue = np.ones((40, 40), bool)
    attention = np.full((40, 40), 1.0)
    attention[:10, :10] = 200.0  # 1/16 of the area, ~93% of the mass
    attention /= attention.sum()
    config = SamplerConfig(n_tiles=3, n_candidates=6, min_distance_thumb_px=3.0)
    hits, draws = 0, 200
    for s in range(draws):
        sampled = attention_draw(attention, tissue, config, np.random.default_rng(s))
        centers = sampled.centers_thumb_rc
        assert len(centers) == 3
        gaps = [np.hypot(*(a - b)) for i, a in enumerate(centers) for b in centers[i + 1:]]
        assert min(gaps) >= 3.0
        hits += int((centers < 10).all(axis=1).sum())
    assert hits / (3 * draws) > 0.8  # most draws land where the mass is
    assert hits / (3 * draws) < 1.0  # but the draw still explores


def _sample_locations_before_the_bands(attention_map, tissue_mask, sampler, mask_kind, rng):
    """``sample_locations`` as it was before its noise and ranking went by bands of rows (map-sized arrays):
    the reference the banded version must reproduce."""
    from dual_attention.sampling import attention_region, greedy_spread, normalise_attention

    tissue = tissue_mask.astype(bool)
    floor = float(attention_map[tissue].min()) if tissue.any() else 0.0
    peak = float(attention_map[tissue].max()) if tissue.any() else 0.0
    if not peak > floor * (1.0 + sampler.min_contrast):
        normalised = np.ones(attention_map.shape, dtype=np.float64)
    else:
        normalised = normalise_attention(np.where(tissue, attention_map, floor))
    region = attention_region(normalised, tissue_mask, mask_kind, seed=int(rng.integers(0, 2**31 - 1)))
    noise = rng.uniform(sampler.noise_low, sampler.noise_high, size=normalised.shape)
    flat = np.where(region, noise + normalised, -np.inf).ravel()
    n_candidates = min(sampler.n_candidates, int(region.sum()))
    top = np.argpartition(-flat, n_candidates - 1)[:n_candidates]
    top = top[np.argsort(-flat[top], kind="stable")]
    candidates = np.stack(np.unravel_index(top, normalised.shape), axis=1)
    kept = greedy_spread(candidates, sampler.min_distance_thumb_px, sampler.n_tiles)
    return candidates[kept], flat[top[kept]]


@pytest.mark.parametrize("band_px", [1 << 18, 999, 1])
@pytest.mark.parametrize("kind", ["positive", "tumour"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])  # scoring's maps are the SAM's float32
def test_banded_sampler_equals_the_map_sized_one(band_px: int, kind: str, dtype: type,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from dual_attention import sampling

    monkeypatch.setattr(sampling, "_BAND_PX", band_px)
    for seed, (h, w) in enumerate([(40, 60), (97, 131), (300, 200)]):
        rng = np.random.default_rng(seed)
        attention = (rng.random((h, w)) ** 4).astype(dtype)
        tissue = np.zeros((h, w), dtype=bool)
        tissue[h // 5:h - 3, 2:w // 2 + 7] = True
        for noise_low, noise_high in ((0.0, 1.0), (-2.0, 1.0), (0.0, 1e-3)):
            config = SamplerConfig(n_tiles=5, n_candidates=10, min_distance_thumb_px=4.0,
                                   noise_low=noise_low, noise_high=noise_high)
            got = sample_locations(attention, tissue, config, kind, np.random.default_rng(seed + 100))
            want = _sample_locations_before_the_bands(attention, tissue, config, kind,
                                                      np.random.default_rng(seed + 100))
            np.testing.assert_array_equal(got.centers_thumb_rc, want[0])
            np.testing.assert_array_equal(got.scores, want[1])
            assert len(got.centers_thumb_rc) == 5


@pytest.mark.parametrize("values", [[0.5], [0.5, 0.5, 0.5], [0.1, 0.9, 0.1], [0.1, 0.5, 0.9], [0.9, 0.1, 0.9, 0.1],
                                    [0.3, 0.3, 0.7, 0.3, 0.5]])
def test_the_distinct_value_check_is_np_uniques(values: list[float]) -> None:
    from dual_attention import sampling

    array = np.asarray(values, dtype=np.float64)
    for count in (2, 3):
        assert sampling._fewer_distinct_than(array, count) == (np.unique(array).size < count)
