"""Thumbnails read in chunks bounded in width and height (issue 12) equal the thumbnails of the
full-width band reader they replace, pixel for pixel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dual_attention import slides
from dual_attention.slides import (
    Slide,
    _box_coefficients,
    _box_resize_axis,
    _pil_resizes_columns_first,
    open_slide,
)


def _band_thumbnail(slide: Slide, downsample: int, band_px: int) -> np.ndarray:
    """The thumbnail reader before issue 12 (bands spanning the level's full width, one PIL resize per
    band), kept here as the reference the chunked reader must reproduce."""
    rows, cols = slide.thumbnail_shape(downsample)
    level = slide._osr.get_best_level_for_downsample(downsample)
    level_downsample = slide.info.level_downsamples[level]
    level_width, level_height = slide.info.level_dimensions[level]
    if level_width * level_height <= band_px**2:
        region = slide._read_rgb((0, 0), level, (level_width, level_height), what="thumbnail")
        return np.asarray(Image.fromarray(region).resize((cols, rows), Image.Resampling.BOX))
    out = np.empty((rows, cols, 3), dtype=np.uint8)
    band_rows = max(1, int(band_px * level_downsample // downsample))
    for row0 in range(0, rows, band_rows):
        row1 = min(rows, row0 + band_rows)
        y0_level0 = row0 * downsample
        band_height_level = max(1, round((row1 - row0) * downsample / level_downsample))
        band_height_level = min(band_height_level, level_height - int(y0_level0 / level_downsample))
        band = slide._read_rgb((0, y0_level0), level, (level_width, max(1, band_height_level)), what="thumbnail")
        out[row0:row1] = np.asarray(Image.fromarray(band).resize((cols, row1 - row0), Image.Resampling.BOX))
    return out


def _box_resize(image: np.ndarray, out_width: int, out_height: int) -> np.ndarray:
    height, width = image.shape[:2]
    passes = [((width, out_width), 1), ((height, out_height), 0)]
    if not _pil_resizes_columns_first(width, height, out_width, out_height):
        passes.reverse()
    for (size_in, size_out), axis in passes:
        image = _box_resize_axis(image, *_box_coefficients(size_in, size_out), axis=axis)
    return image


def test_box_resize_is_pils_box_resize_bit_for_bit() -> None:
    """The numpy BOX resize (and its pass order) equals the installed Pillow's on random sizes, down and
    up: if a Pillow release changes its arithmetic, this fails before any thumbnail does."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        height, width = (int(v) for v in rng.integers(1, 160, size=2))
        out_height, out_width = int(rng.integers(1, height + 3)), int(rng.integers(1, width + 3))
        image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        expected = np.asarray(Image.fromarray(image).resize((out_width, out_height), Image.Resampling.BOX))
        np.testing.assert_array_equal(_box_resize(image, out_width, out_height), expected,
                                      err_msg=f"{width}x{height} -> {out_width}x{out_height}")


class _ReadSpy:
    """Records the (width, height) of every region ``Slide._read_rgb`` reads."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: list[tuple[int, int]] = []
        original = Slide._read_rgb

        def spy(slide: Slide, location, level, size, what):
            self.sizes.append(tuple(size))
            return original(slide, location, level, size, what)

        monkeypatch.setattr(Slide, "_read_rgb", spy)


# (file, downsample, band px): small bands force the chunked path on these small real slides.
REAL_CASES = [
    ("aperio/CMU-1-Small-Region.svs", 32, 256),
    ("aperio/CMU-1-Small-Region.svs", 7, 300),
    ("aperio/CMU-1-Small-Region.svs", 3, 1000),
    ("generic-tiff/boxes.tiff", 1, 40),
    ("generic-tiff/boxes.tiff", 2, 30),
    ("generic-tiff/boxes.tiff", 3, 37),
    ("aperio/small.svs", 3, 5),
    ("dicom/boxes/boxes_0.dcm", 2, 6),
]


@pytest.mark.parametrize(("name", "downsample", "band_px"), REAL_CASES)
def test_chunked_thumbnail_equals_band_thumbnail_on_real_slides(
    shared_slides: Path, monkeypatch: pytest.MonkeyPatch, name: str, downsample: int, band_px: int
) -> None:
    monkeypatch.setattr(slides, "_THUMBNAIL_BAND_LEVEL_PX", band_px)
    with open_slide(shared_slides / name) as slide:
        expected = _band_thumbnail(slide, downsample, band_px)
        spy = _ReadSpy(monkeypatch)
        thumbnail = slide.thumbnail(downsample)
    np.testing.assert_array_equal(thumbnail, expected)
    assert len(spy.sizes) > 1, "the chunked path ran"
    scale = max(1, downsample)  # a chunk may reach one output pixel past the bound
    assert all(w <= band_px + 2 * scale and h <= band_px + 2 * scale for w, h in spy.sizes), spy.sizes


def test_chunked_thumbnail_on_non_integer_downsample_levels_is_within_a_grey_level(
    shared_slides: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """boxes.tiff's level 2 has downsample 4.016: OpenSlide places a chunk that starts at a column of
    that level with sub-pixel interpolation, so columns at the seams may differ slightly (the bands' rows
    always did)."""
    monkeypatch.setattr(slides, "_THUMBNAIL_BAND_LEVEL_PX", 30)
    with open_slide(shared_slides / "generic-tiff/boxes.tiff") as slide:
        assert slide._osr.get_best_level_for_downsample(5) == 2
        expected = _band_thumbnail(slide, 5, 30).astype(int)
        thumbnail = slide.thumbnail(5).astype(int)
    assert thumbnail.shape == expected.shape
    assert np.abs(thumbnail - expected).mean() < 2.0


def _wide_tiff(path: Path, width: int, height: int) -> None:
    """A single-level tiled TIFF (OpenSlide's generic-tiff) with structure at every scale."""
    import tifffile

    rows = np.arange(height, dtype=np.uint32)[:, None]
    cols = np.arange(width, dtype=np.uint32)[None, :]
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[..., 0] = (cols * 7 + rows * 3) % 251
    image[..., 1] = ((cols // 37) * 29 + (rows // 23) * 13) % 256
    image[..., 2] = (cols ^ rows) % 256
    tifffile.imwrite(path, image, tile=(256, 256), compression="zlib", photometric="rgb")


def test_chunked_thumbnail_equals_band_thumbnail_on_a_wide_single_level_tiff(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 16,640 x 1,100 single-level slide (over the 4096^2 single-read area) with the real constants:
    the same thumbnail as the full-width bands, read in chunks at most ~4096 px wide."""
    path = tmp_path / "wide.tiff"
    _wide_tiff(path, 16_640, 1_100)
    with open_slide(path) as slide:
        assert slide.info.level_dimensions == ((16_640, 1_100),)
        expected = _band_thumbnail(slide, 32, slides._THUMBNAIL_BAND_LEVEL_PX)
        spy = _ReadSpy(monkeypatch)
        thumbnail = slide.thumbnail(32)
    np.testing.assert_array_equal(thumbnail, expected)
    assert len(spy.sizes) >= 5 and max(w for w, _ in spy.sizes) <= slides._THUMBNAIL_BAND_LEVEL_PX + 64
