"""Reads from a TIFF's own JPEG tiles (dual_attention/tiff_tiles.py) give OpenSlide's pixels exactly, on
every level they serve, and leave to OpenSlide what they do not serve."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from dual_attention.slides import Level0Box, Slide, SlideError, open_slide
from dual_attention.synthetic import write_synthetic_slide


def _openslide_only(path: Path) -> Slide:
    slide = open_slide(path)
    assert slide._tiff_tiles is not None, f"{path.name}: the fast reader should serve this slide"
    slide._tiff_tiles.close()
    slide._tiff_tiles = None
    return slide


def _boxes(width: int, height: int, rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    """Boxes on tile seams, inside, across the edges and wholly outside the level."""
    boxes = [(0, 0, min(256, width), min(256, height)), (255, 255, 2, 2), (width - 100, height - 80, 300, 200),
             (-50, -40, 120, 90), (width + 10, 0, 16, 16)]
    for _ in range(6):
        w, h = int(rng.integers(1, 700)), int(rng.integers(1, 700))
        boxes.append((int(rng.integers(-w // 2, width)), int(rng.integers(-h // 2, height)), w, h))
    return boxes


def _assert_same_pixels(path: Path) -> int:
    """Every level the fast reader serves against OpenSlide; returns how many levels it served."""
    rng = np.random.default_rng(7)
    with open_slide(path) as fast, _openslide_only(path) as reference:
        served = sorted(fast._tiff_tiles._levels)
        for level in served:
            width, height = fast.info.level_dimensions[level]
            scale = round(fast.info.level_downsamples[level])
            for x, y, w, h in _boxes(width, height, rng):
                location = (x * scale, y * scale)
                got = fast._read_rgb(location, level, (w, h), what="test")
                want = reference._read_rgb(location, level, (w, h), what="test")
                assert got.shape == want.shape == (h, w, 3)
                assert np.array_equal(got, want), f"{path.name} level {level} box {(x, y, w, h)}"
    return len(served)


@pytest.mark.parametrize("name", ["aperio/CMU-1-Small-Region.svs", "aperio/small.svs"])
def test_shared_svs_reads_equal_openslide(shared_slides: Path, name: str) -> None:
    assert _assert_same_pixels(shared_slides / name) >= 1


def test_synthetic_pyramid_reads_equal_openslide_on_every_level(tmp_path: Path) -> None:
    # Odd level-0 sides: the reduced levels' downsamples are not whole numbers there, a case the fast reader
    # must either serve exactly or leave to OpenSlide.
    for objective_power, size in ((40.0, (3000, 2304)), (None, (2603, 1999))):
        path = tmp_path / f"s{size[0]}.tiff"
        write_synthetic_slide(path, "her2", 2, seed=5, width_level0_px=size[0], height_level0_px=size[1],
                              objective_power=objective_power)
        assert _assert_same_pixels(path) >= 1


def test_scores_boxes_and_thumbnails_equal_openslide(tmp_path: Path) -> None:
    path = tmp_path / "s.tiff"
    write_synthetic_slide(path, "mmr", 1, seed=9, width_level0_px=4096, height_level0_px=3072)
    with open_slide(path) as fast, _openslide_only(path) as reference:
        assert np.array_equal(fast.thumbnail(32), reference.thumbnail(32))
        box = Level0Box(1000, 700, 2048, 2048)
        assert np.array_equal(fast.read_box(box), reference.read_box(box))
        assert np.array_equal(fast.read_box_at_magnification(box, 20), reference.read_box_at_magnification(box, 20))


def test_parallel_reads_are_the_same_as_serial(tmp_path: Path) -> None:
    path = tmp_path / "s.tiff"
    write_synthetic_slide(path, "her2", 3, seed=3, width_level0_px=4096, height_level0_px=4096)
    boxes = [Level0Box(int(x), int(y), 512, 512) for x, y in np.random.default_rng(1).integers(0, 3584, (24, 2))]
    with open_slide(path) as slide:
        serial = [slide.read_box(box) for box in boxes]
        with ThreadPoolExecutor(4) as pool:
            parallel = list(pool.map(slide.read_box, boxes))
        stacked = slide.read_boxes(boxes, threads=3)
        stacked_20x = slide.read_boxes(boxes, out_px=(256, 256), threads=2)
        serial_20x = [slide.read_box(box, (256, 256)) for box in boxes]
    assert all(np.array_equal(a, b) for a, b in zip(serial, parallel, strict=True))
    assert np.array_equal(stacked, np.stack(serial))
    assert np.array_equal(stacked_20x, np.stack(serial_20x))


def test_slides_it_does_not_serve_are_read_by_openslide(shared_slides: Path) -> None:
    # DICOM is not a TIFF; the generic TIFF here is not JPEG-compressed.
    for name in ["dicom/boxes/boxes_0.dcm", "generic-tiff/boxes.tiff"]:
        with open_slide(shared_slides / name) as slide:
            assert slide._tiff_tiles is None
            assert slide.read_box(Level0Box(0, 0, 16, 16)).shape == (16, 16, 3)


def test_broken_slides_still_fail_with_a_slide_error(shared_slides: Path) -> None:
    for name in ["broken/unopenable.tiff", "broken/unreadable.svs", "broken/histolab-broken.svs"]:
        with pytest.raises(SlideError), open_slide(shared_slides / name) as slide:
            slide.thumbnail(32)
            slide.read_box(Level0Box(0, 0, 512, 512))
