"""Slide access on the real files in ../shared/slides, the tissue mask, and the coordinate mapping."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import openslide
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from dual_attention.slides import (
    Level0Box,
    SlideError,
    SlideHandleCache,
    level0_to_thumb_rc,
    open_slide,
    slide_view,
    thumb_to_level0_box,
    tissue_mask,
)

# (relative path, level dimensions, mpp or None where the file's value is not a microscope's)
GOOD_SLIDES = [
    ("aperio/CMU-1-Small-Region.svs", ((2220, 2967),), 0.499),
    ("aperio/small.svs", ((16, 16),), 0.499),
    ("generic-tiff/boxes.tiff", ((300, 250), (150, 125), (75, 62), (37, 31)), None),
    ("dicom/boxes/boxes_0.dcm", ((16, 16),), 0.499),
]
BROKEN_SLIDES = ["broken/unreadable.svs", "broken/unopenable.tiff", "broken/histolab-broken.svs"]


def _direct_rgb(path: Path, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as osr:
        rgba = np.asarray(osr.read_region(location, level, size))
    return rgba[..., :3]


@pytest.mark.parametrize(("name", "level_dimensions", "mpp"), GOOD_SLIDES)
def test_good_slide_metadata(shared_slides: Path, name: str, level_dimensions: tuple, mpp: float | None) -> None:
    with open_slide(shared_slides / name) as slide:
        assert slide.info.level_dimensions == level_dimensions
        assert slide.dimensions == level_dimensions[0]
        if mpp is not None:
            assert slide.info.mpp_x == pytest.approx(mpp)
            assert slide.info.mpp_source == "file"
            assert slide.info.objective_power == 20 and slide.info.objective_source == "file"
        else:  # boxes.tiff: 72-dpi tags give 352 µm/px; refused as implausible, a stated default used
            assert slide.info.mpp_source.startswith("default")
            assert slide.info.objective_source == "default"
            assert slide.info.mpp_x == pytest.approx(10.0 / slide.info.objective_power)


@pytest.mark.parametrize(("name", "level_dimensions", "mpp"), GOOD_SLIDES)
def test_region_read_equals_direct_openslide(shared_slides: Path, name: str, level_dimensions: tuple, mpp) -> None:
    width, height = level_dimensions[0]
    box = Level0Box(width // 4, height // 4, max(1, width // 2), max(1, height // 2))
    with open_slide(shared_slides / name) as slide:
        ours = slide.read_box(box)
    direct = _direct_rgb(shared_slides / name, (box.x0, box.y0), 0, (box.width, box.height))
    assert ours.shape == (box.height, box.width, 3) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, direct)


@pytest.mark.parametrize("downsample", [4, 8, 32])
def test_thumbnail_shape_and_pixels(shared_slides: Path, downsample: int) -> None:
    path = shared_slides / "aperio/CMU-1-Small-Region.svs"
    with open_slide(path) as slide:
        thumb = slide.thumbnail(downsample)
    width, height = 2220, 2967
    assert thumb.shape == (-(-height // downsample), -(-width // downsample), 3)
    # Independent check: block means of the full-resolution image agree with the thumbnail.
    full = _direct_rgb(path, (0, 0), 0, (width, height)).astype(float)
    rows, cols = height // downsample, width // downsample
    blocks = full[: rows * downsample, : cols * downsample].reshape(rows, downsample, cols, downsample, 3)
    block_means = blocks.mean(axis=(1, 3))
    # The resize maps the image edge to the thumbnail edge, so inner blocks agree to a few grey levels.
    error = np.abs(block_means[1:-1, 1:-1] - thumb[1 : rows - 1, 1 : cols - 1].astype(float))
    assert np.median(error) < 6


def test_slide_view_is_the_thumbnail_its_tissue_mask_and_level0_size_and_times_both(shared_slides: Path) -> None:
    from dual_attention.profiling import StageTimer

    path = shared_slides / "aperio/CMU-1-Small-Region.svs"
    timer = StageTimer()
    with open_slide(path) as slide:
        view = slide_view(slide, 16, 8, timer)
        thumbnail = slide.thumbnail(16)
    assert np.array_equal(view.thumbnail, thumbnail)
    assert view.tissue_mask.dtype == bool and np.array_equal(view.tissue_mask, tissue_mask(thumbnail, 8))
    assert view.tissue_mask.any() and view.level0_dims == (2220, 2967)
    assert set(timer.ms) == {"thumbnail", "tissue_mask"}


def test_thumbnail_from_pyramid_with_non_integer_downsamples(shared_slides: Path) -> None:
    path = shared_slides / "generic-tiff/boxes.tiff"
    with open_slide(path) as slide:
        thumb = slide.thumbnail(5)  # no level has downsample 5: read level 2 (4.016) and resize
    assert thumb.shape == (50, 60, 3)
    level2 = _direct_rgb(path, (0, 0), 2, (75, 62))
    expected = np.asarray(Image.fromarray(level2).resize((60, 50), Image.Resampling.BOX))
    np.testing.assert_array_equal(thumb, expected)


def test_read_at_lower_magnification_than_any_level(shared_slides: Path) -> None:
    """A 10x read from a 20x slide with a single level: the area average of 2x2 level-0 blocks."""
    path = shared_slides / "aperio/CMU-1-Small-Region.svs"
    box = Level0Box(400, 600, 256, 192)
    with open_slide(path) as slide:
        low_power = slide.read_box_at_magnification(box, 10)
    assert low_power.shape == (96, 128, 3)
    full = _direct_rgb(path, (box.x0, box.y0), 0, (box.width, box.height)).astype(float)
    block_means = full.reshape(96, 2, 128, 2, 3).mean(axis=(1, 3))
    assert np.abs(block_means - low_power).max() <= 1.0


@pytest.mark.parametrize("name", BROKEN_SLIDES)
def test_broken_slides_raise_slide_error_naming_the_file(shared_slides: Path, name: str) -> None:
    path = shared_slides / name
    with pytest.raises(SlideError) as caught, open_slide(path) as slide:
        slide.thumbnail(32)
    assert caught.value.path == str(path)
    assert Path(name).name in str(caught.value)
    assert caught.value.reason


def test_missing_file_raises_slide_error(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="no such file"):
        open_slide(tmp_path / "absent.svs")


def test_read_region_error_names_the_region(shared_slides: Path) -> None:
    with open_slide(shared_slides / "broken/unreadable.svs") as slide, pytest.raises(SlideError, match="region"):
        slide.read_box(Level0Box(0, 0, 64, 64))


def test_outside_scanned_area_reads_as_white(shared_slides: Path) -> None:
    with open_slide(shared_slides / "aperio/small.svs") as slide:
        pixels = slide.read_box(Level0Box(8, 8, 16, 16))  # half outside the 16x16 slide
    assert (pixels[8:, 8:] == 255).all()


def test_handle_cache_is_bounded_and_thread_safe(shared_slides: Path) -> None:
    paths = [shared_slides / name for name, _, _ in GOOD_SLIDES]
    cache = SlideHandleCache(max_open=2)
    box = Level0Box(0, 0, 16, 16)
    expected = {str(p): open_slide(p).read_box(box) for p in paths}
    failures: list[str] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(25):
            path = paths[rng.integers(len(paths))]
            if not np.array_equal(cache.get(path).read_box(box), expected[str(path)]):
                failures.append(str(path))
            assert len(cache) <= 2

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    assert len(cache) <= 2


def test_handle_cache_reuses_open_slides(shared_slides: Path) -> None:
    cache = SlideHandleCache(max_open=4)
    path = shared_slides / "aperio/small.svs"
    assert cache.get(path) is cache.get(path)
    with pytest.raises(SlideError):
        cache.get(shared_slides / "broken/histolab-broken.svs")
    assert len(cache) == 1


def test_tissue_mask_keeps_tissue_and_drops_glass_pen_and_dark() -> None:
    thumb = np.full((64, 64, 3), 245, dtype=np.uint8)  # glass
    rows, cols = np.mgrid[:64, :64]
    tissue = (rows - 32) ** 2 + (cols - 20) ** 2 < 12**2
    thumb[tissue] = (200, 120, 170)  # pink/purple tissue
    thumb[5:60, 45:48] = (30, 160, 60)  # green pen stroke
    thumb[50:60, 5:15] = (10, 10, 10)  # black ink / dirt
    mask = tissue_mask(thumb)
    assert mask.shape == (64, 64) and mask.dtype == bool
    assert mask[tissue].mean() > 0.95
    assert not mask[5:60, 45:48].any()
    assert not mask[50:60, 5:15].any()
    assert mask[~tissue].mean() < 0.01


def test_tissue_mask_of_blank_glass_is_empty() -> None:
    assert not tissue_mask(np.full((32, 32, 3), 250, dtype=np.uint8)).any()


@given(
    width=st.integers(64, 200_000),
    height=st.integers(64, 200_000),
    downsample=st.sampled_from([8, 16, 32, 64]),
    tile=st.integers(16, 4096),
    frac_r=st.floats(0, 1),
    frac_c=st.floats(0, 1),
)
def test_thumbnail_level0_mapping_properties(width, height, downsample, tile, frac_r, frac_c) -> None:
    rows, cols = -(-height // downsample), -(-width // downsample)
    rc = (frac_r * (rows - 1), frac_c * (cols - 1))
    box = thumb_to_level0_box(rc, downsample, tile, (width, height))
    assert box.width == box.height == tile
    if tile <= width:
        assert box.x0 >= 0 and box.x0 + tile <= width
    if tile <= height:
        assert box.y0 >= 0 and box.y0 + tile <= height
    # Where the tile was not shifted by an edge, its centre maps back to the same thumbnail point.
    center_rc = level0_to_thumb_rc(box.x0 + tile / 2, box.y0 + tile / 2, downsample)
    unshifted_x = tile / 2 <= (rc[1] + 0.5) * downsample <= width - tile / 2
    unshifted_y = tile / 2 <= (rc[0] + 0.5) * downsample <= height - tile / 2
    if unshifted_x:
        assert abs(center_rc[1] - rc[1]) <= 0.5 / downsample + 1e-9
    if unshifted_y:
        assert abs(center_rc[0] - rc[0]) <= 0.5 / downsample + 1e-9


@pytest.mark.parametrize(("task", "label"), [("her2", 0), ("her2", 3), ("mmr", 1)])
def test_tissue_mask_finds_pale_stroma_of_synthetic_slides(tmp_path: Path, task: str, label: int) -> None:
    """Pale stroma is tissue too: a two-class threshold would keep only the dense tumour."""
    from dual_attention.metrics import dice
    from dual_attention.synthetic import make_layout, write_synthetic_slide

    path = tmp_path / f"{task}-{label}.tiff"
    write_synthetic_slide(path, task, label, seed=7, width_level0_px=2048, height_level0_px=2048)
    with open_slide(path) as slide:
        mask = tissue_mask(slide.thumbnail(32), min_area_thumb_px=4)
    truth = make_layout(task, label, 7, 2048, 2048).tissue_mask()
    assert dice(mask, truth) > 0.85


def test_ink_and_dark_pixels_are_those_of_the_whole_image_hsv() -> None:
    """tissue_mask's HSV on candidate pixels only (``_ink_or_dark``) flags exactly what the whole image's HSV
    flags: on 2M random colours and every colour near the bounds it relies on (value 52-53, saturation
    0.24-0.25 and 0.6), greys and black. (All 16.7M colours were checked once, equal.)"""
    from dual_attention.slides import _ink_or_dark, _ink_or_dark_whole_image

    rng = np.random.default_rng(5)
    colours = [rng.integers(0, 256, (2_000_000, 3))]
    grid = np.stack(np.meshgrid(np.arange(256), np.arange(256), indexing="ij"), -1).reshape(-1, 2)
    for top in (0, 1, 50, 51, 52, 53, 54, 200, 255):  # every (a, b) with the largest channel at `top`
        keep = grid[(grid <= top).all(axis=1)]
        for order in ((0, 1, 2), (1, 2, 0), (2, 0, 1)):
            block = np.empty((len(keep), 3), dtype=np.int64)
            block[:, order[0]] = top
            block[:, order[1]], block[:, order[2]] = keep[:, 0], keep[:, 1]
            colours.append(block)
    rgb = np.concatenate(colours).astype(np.uint8)[:, None, :]
    expected = _ink_or_dark_whole_image(rgb)
    assert expected.any() and not expected.all()
    np.testing.assert_array_equal(_ink_or_dark(rgb), expected)


@pytest.mark.parametrize("band_px", [1 << 19, 5000, 37])
def test_tissue_mask_in_bands_equals_the_whole_image_mask(shared_slides: Path, band_px: int,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """tissue_mask's bands of rows (bounded memory) give the mask of the whole image at once, pixel for pixel:
    real slides at several downsamples, noise with ink colours, a flat and a two-level image."""
    from dual_attention import slides as slides_module
    from dual_attention.slides import _tissue_mask_whole_image

    images = []
    for name in ("aperio/CMU-1-Small-Region.svs", "aperio/small.svs"):
        with open_slide(shared_slides / name) as slide:
            images += [slide.thumbnail(downsample) for downsample in (4, 16, 32)]
    rng = np.random.default_rng(3)
    images += [(rng.random((300 + 50 * k, 400, 3)) * 255).astype(np.uint8) for k in range(3)]
    flat = np.full((100, 100, 3), 240, np.uint8)
    two_levels = flat.copy()
    two_levels[30:60, 30:60] = 120
    images += [flat, two_levels]
    monkeypatch.setattr(slides_module, "_MASK_BAND_PX", band_px)
    for image in images:
        np.testing.assert_array_equal(tissue_mask(image), _tissue_mask_whole_image(image))
    assert any(tissue_mask(image).any() for image in images)


@pytest.mark.parametrize("band_px", [1 << 17, 64])
def test_small_components_go_as_skimage_removes_them(monkeypatch: pytest.MonkeyPatch, band_px: int) -> None:
    from skimage import morphology

    from dual_attention import slides as slides_module

    monkeypatch.setattr(slides_module, "_MASK_BAND_PX", band_px)
    rng = np.random.default_rng(5)
    for density in (0.2, 0.5, 0.8):
        mask = rng.random((97, 131)) < density
        for max_size in (0, 1, 3, 15):
            np.testing.assert_array_equal(slides_module._without_small_components(mask, max_size, value=True),
                                          morphology.remove_small_objects(mask, max_size=max_size))
            np.testing.assert_array_equal(slides_module._without_small_components(mask, max(1, max_size), value=False),
                                          morphology.remove_small_holes(mask, max_size=max(1, max_size)))
