"""Streaming a power-of-two JPEG pyramid to a tiled TIFF that OpenSlide opens (``write_pyramid``): level 0 is
rendered one strip of tiles at a time, each strip's 2x mean feeds the next level through a temporary file, so
memory stays bounded by a strip, never a level.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import nullcontext as _nothing
from pathlib import Path

import numpy as np
import tifffile
from tqdm import tqdm

from dual_attention.synthetic.layout import MPP_40X, OBJECTIVE_POWER, TILE_PX

SMALLEST_LEVEL_PX = 512  # the pyramid stops once a level's longer side is at most this
JPEG_QUALITY = 90
RenderStrip = Callable[[int, int], np.ndarray]  # (y0_level0, rows) -> (rows, width, 3) uint8


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


def _pyramid_pixels(width: int, height: int) -> int:
    return sum(w * h for w, h in _level_dimensions(width, height))
