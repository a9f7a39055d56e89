"""Region reads straight from a TIFF's JPEG tiles: the fast backend behind ``Slide`` for Aperio SVS and
generic tiled TIFF pyramids.

OpenSlide's ``read_region`` decodes each JPEG tile, converts it to premultiplied ARGB, caches it and blits
it, and openslide-python converts the result to RGBA: 38-60 MP per CPU-second here, against 220-400 MP/s
for libjpeg-turbo decoding the same tiles (``benchmarks/bench_slide_cost.py``). This reader decodes the
tiles a region covers with tifffile + imagecodecs (the same libjpeg-turbo) and copies them into place: the
pixels are identical to OpenSlide's (``tests/test_tiff_tiles.py`` checks every level of the shared slides and
synthetic ones), at 6-20x the speed. Anything it is not sure of (other vendors, whose tiles may overlap or be
sparse, non-JPEG compression, a level it cannot match to a page, a location between level pixels) is left
to OpenSlide: ``TiffTileLevels.open`` returns ``None`` or ``read`` returns ``None``.

Coordinates are level pixels ``(x, y)`` of the OpenSlide level; pixels outside the level are white glass,
as ``Slide`` shows OpenSlide's transparent pixels.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import tifffile

# OpenSlide vendors whose levels are plain tiled pages: a page's tiles abut, none is missing.
_PLAIN_TIFF_VENDORS = ("aperio", "generic-tiff")
_JPEG = 7
_RGB, _YCBCR = 2, 6
_GLASS = 255


@dataclass(frozen=True)
class _LevelPage:
    """One pyramid level's tiled JPEG page: where its tiles lie in the file and how to decode one."""

    width: int
    height: int
    tile_width: int
    tile_height: int
    offsets: np.ndarray  # (n_tiles,) byte offsets, row-major tile order
    byte_counts: np.ndarray
    decode: Callable  # tifffile's decoder for this page: (bytes, index, jpegtables=...) -> (segment, ...)
    jpeg_tables: bytes | None

    @property
    def tiles_across(self) -> int:
        return -(-self.width // self.tile_width)


class TiffTileLevels:
    """The JPEG-tiled pages of one TIFF slide, by OpenSlide level index. Thread-safe reads (``os.pread``)."""

    def __init__(self, path: str, levels: dict[int, _LevelPage]) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._levels = levels

    @classmethod
    def open(cls, path: str, vendor: str, level_dimensions: Sequence[tuple[int, int]]) -> TiffTileLevels | None:
        """The fast reader for the levels of ``path`` that qualify, or ``None`` (OpenSlide reads them all)."""
        if vendor not in _PLAIN_TIFF_VENDORS:
            return None
        try:
            with tifffile.TiffFile(path) as tif:
                pages = [page for page in tif.pages if _is_plain_jpeg_tiles(page)]
                by_dims: dict[tuple[int, int], list[tifffile.TiffPage]] = {}
                for page in pages:
                    by_dims.setdefault((page.imagewidth, page.imagelength), []).append(page)
                levels = {}
                for index, dims in enumerate(level_dimensions):
                    candidates = by_dims.get(tuple(dims), [])
                    if len(candidates) == 1:  # a level matched to exactly one page, else OpenSlide decides
                        levels[index] = _level_page(candidates[0])
        except Exception:  # noqa: BLE001 - any doubt about the file: OpenSlide reads it, and reports errors
            return None
        if 0 not in levels:
            return None
        return cls(path, levels)

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray | None:
        """(height, width, 3) uint8 of level pixels [x, x+width) x [y, y+height), or ``None`` when this level
        is not one this reader has or a tile cannot be read (OpenSlide then reads the region and reports)."""
        page = self._levels.get(level)
        if page is None:
            return None
        out = np.full((height, width, 3), _GLASS, dtype=np.uint8)
        th, tw = page.tile_height, page.tile_width
        # The part of the region inside the level; the rest stays glass.
        inside_x0, inside_x1 = max(x, 0), min(x + width, page.width)
        inside_y0, inside_y1 = max(y, 0), min(y + height, page.height)
        if inside_x1 <= inside_x0 or inside_y1 <= inside_y0:
            return out
        row_first, row_last = inside_y0 // th, -(-inside_y1 // th)
        col_first, col_last = inside_x0 // tw, -(-inside_x1 // tw)
        for tile_row in range(row_first, row_last):
            for tile_col in range(col_first, col_last):
                index = tile_row * page.tiles_across + tile_col
                count = int(page.byte_counts[index])
                if count == 0:
                    return None  # a missing tile: OpenSlide knows what the format means by it
                try:
                    data = os.pread(self._fd, count, int(page.offsets[index]))
                    segment = page.decode(data, index, jpegtables=page.jpeg_tables)[0]
                except Exception:  # noqa: BLE001 - a damaged tile: OpenSlide reads it and names the error
                    return None
                segment = segment.reshape(segment.shape[-3:])  # (1, h, w, 3) -> (h, w, 3)
                top, left = tile_row * th, tile_col * tw
                y0, y1 = max(inside_y0, top), min(inside_y1, top + th)
                x0, x1 = max(inside_x0, left), min(inside_x1, left + tw)
                out[y0 - y:y1 - y, x0 - x:x1 - x] = segment[y0 - top:y1 - top, x0 - left:x1 - left]
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _is_plain_jpeg_tiles(page: tifffile.TiffPage) -> bool:
    return (page.is_tiled and page.compression == _JPEG and page.photometric in (_RGB, _YCBCR)
            and page.samplesperpixel == 3 and page.bitspersample == 8 and page.planarconfig == 1
            and page.imagedepth == 1 and len(page.dataoffsets) == len(page.databytecounts))


def _level_page(page: tifffile.TiffPage) -> _LevelPage:
    return _LevelPage(width=page.imagewidth, height=page.imagelength, tile_width=page.tilewidth,
                      tile_height=page.tilelength, offsets=np.asarray(page.dataoffsets, dtype=np.int64),
                      byte_counts=np.asarray(page.databytecounts, dtype=np.int64), decode=page.decode,
                      jpeg_tables=page.jpegtables)
