"""Slide access: open any slide OpenSlide reads, thumbnails, tissue masks, region reads, coordinates.

Coordinate frames:
- level 0: pixels of the full-resolution level, ``(x, y)`` with x to the right; boxes are ``Level0Box``.
- thumbnail: the image at 1/``downsample`` of level 0, indexed ``(row, col)``; thumbnail pixel (r, c)
  covers level-0 ``[c*s, (c+1)*s) x [r*s, (r+1)*s)``, so its centre is ``((c+0.5)*s, (r+0.5)*s)``.
``thumb_to_level0_box`` and ``level0_to_thumb_rc`` are the one mapping between the two.

Every problem with a slide file surfaces as ``SlideError`` naming the file and the cause.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openslide
from PIL import Image
from scipy import ndimage
from skimage import color, filters, morphology

from dual_attention.profiling import StageTimer
from dual_attention.tiff_tiles import TiffTileLevels

DEFAULT_THUMBNAIL_DOWNSAMPLE = 32
FALLBACK_OBJECTIVE_POWER = 40.0  # when a file records neither objective power nor a plausible mpp
PLAUSIBLE_MPP_RANGE = (0.05, 20.0)  # µm/px; a 72-dpi TIFF tag gives 352 µm/px, which is no microscope
# Threads that read a slide's tiles side by side (``Slide.read_boxes``): the cores of a small scoring node.
READ_THREADS = 2
# Band height (level pixels) for thumbnails of slides without a suitable pyramid level: bounds memory.
_THUMBNAIL_BAND_LEVEL_PX = 4096


class SlideError(Exception):
    """A slide cannot be opened or read. ``path`` names the file, ``reason`` the cause."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keeps path and reason when the error crosses process boundaries (Ray)
        return (SlideError, (self.path, self.reason))


@dataclass(frozen=True)
class Level0Box:
    """A rectangle in level-0 pixel coordinates."""

    x0: int
    y0: int
    width: int
    height: int

    @property
    def area_level0_px(self) -> int:
        return self.width * self.height

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.x0, self.y0, self.width, self.height)


@dataclass(frozen=True)
class SlideInfo:
    path: str
    vendor: str
    level_dimensions: tuple[tuple[int, int], ...]  # (width, height) per level
    level_downsamples: tuple[float, ...]
    mpp_x: float  # µm per level-0 pixel
    mpp_y: float
    mpp_source: str  # "file", "objective-power" or "default (assumed 40x)"
    objective_power: float
    objective_source: str  # "file", "mpp" or "default"

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]


def calibration_dict(info: SlideInfo) -> dict[str, Any]:
    """The slide's scale and its sources, as the HTTP API's ``calibration`` field: a slide scored at an
    assumed magnification says so."""
    return {"mpp_x_um_per_px": info.mpp_x, "mpp_y_um_per_px": info.mpp_y, "mpp_source": info.mpp_source,
            "objective_power": info.objective_power, "objective_source": info.objective_source}


def open_slide(path: str | Path) -> Slide:
    """Open a slide; any file OpenSlide cannot open raises ``SlideError`` naming it and the cause."""
    return Slide(path)


class Slide:
    """An open slide. Reads are thread-safe (libopenslide is); ``close`` must not race with reads."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if not Path(self.path).is_file():
            raise SlideError(self.path, "no such file")
        try:
            self._osr = openslide.OpenSlide(self.path)
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideError(self.path, "unsupported or unrecognised slide format") from None
        except openslide.OpenSlideError as exc:
            raise SlideError(self.path, f"corrupt or unsupported slide file: {exc}") from None
        except OSError as exc:
            raise SlideError(self.path, f"cannot read file: {exc}") from None
        self.info = _slide_info(self.path, self._osr)
        # JPEG-tiled TIFF levels (Aperio, generic TIFF) are read straight from their tiles: the same pixels
        # as OpenSlide's, 6-20x faster (dual_attention/tiff_tiles.py); None: OpenSlide reads everything.
        self._tiff_tiles = TiffTileLevels.open(self.path, self.info.vendor, self.info.level_dimensions)

    # -- metadata ---------------------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return self.info.dimensions

    def thumbnail_shape(self, downsample: int = DEFAULT_THUMBNAIL_DOWNSAMPLE) -> tuple[int, int]:
        """(rows, cols) of the thumbnail at 1/downsample; partial pixels at the edges count as pixels."""
        width, height = self.dimensions
        return (max(1, math.ceil(height / downsample)), max(1, math.ceil(width / downsample)))

    def thumbnail_level(self, downsample: int = DEFAULT_THUMBNAIL_DOWNSAMPLE) -> int:
        """The pyramid level ``thumbnail`` reads (the nearest level at least as fine as ``downsample``)."""
        return int(self._osr.get_best_level_for_downsample(downsample))

    def thumbnail_decode_bytes(self, downsample: int = DEFAULT_THUMBNAIL_DOWNSAMPLE) -> int:
        """Bytes ``thumbnail`` decodes: the RGBA pixels of the whole level it reads, as the header
        declares them. Known before any pixel is read, so a caller can refuse a slide whose file is small
        but whose (pyramid-less) level 0 is huge."""
        width, height = self.info.level_dimensions[self.thumbnail_level(downsample)]
        return width * height * 4

    # -- pixels ---------------------------------------------------------------------------------------
    def thumbnail(self, downsample: int = DEFAULT_THUMBNAIL_DOWNSAMPLE) -> np.ndarray:
        """The slide at 1/downsample of level 0 as (rows, cols, 3) uint8, read from the nearest finer level
        and resized (a slide rarely has a level at exactly that downsample)."""
        rows, cols = self.thumbnail_shape(downsample)
        level = self.thumbnail_level(downsample)
        level_downsample = self.info.level_downsamples[level]
        level_width, level_height = self.info.level_dimensions[level]
        if level_width * level_height <= _THUMBNAIL_BAND_LEVEL_PX**2:
            region = self._read_rgb((0, 0), level, (level_width, level_height), what="thumbnail")
            if (level_width, level_height) == (cols, rows):  # a level at exactly 1/downsample: as it is
                return np.ascontiguousarray(region)  # PIL's same-size resize is a copy: 3 thumbnail copies saved
            return np.asarray(Image.fromarray(region).resize((cols, rows), Image.Resampling.BOX))
        # Large level: bands of whole thumbnail rows (as before), each read in chunks of columns, so that a
        # read is bounded in both width and height. Each band is resized as one image was before: its
        # chunks are resized with the whole band's geometry (``_box_coefficients``, ``_box_resize_axis``:
        # PIL's BOX filter bit for bit, in PIL's pass order), so the thumbnail does not depend on chunking.
        out = np.empty((rows, cols, 3), dtype=np.uint8)
        band_rows = max(1, int(_THUMBNAIL_BAND_LEVEL_PX * level_downsample // downsample))
        col_lo, col_hi, col_kk = _box_coefficients(level_width, cols)
        cols_per_chunk = max(1, int(_THUMBNAIL_BAND_LEVEL_PX // (level_width / cols)))
        for row0 in range(0, rows, band_rows):
            row1 = min(rows, row0 + band_rows)
            y0_level0 = row0 * downsample
            band_height_level = max(1, round((row1 - row0) * downsample / level_downsample))
            band_height_level = max(1, min(band_height_level, level_height - int(y0_level0 / level_downsample)))
            row_lo, row_hi, row_kk = _box_coefficients(band_height_level, row1 - row0)
            for col0 in range(0, cols, cols_per_chunk):
                col1 = min(cols, col0 + cols_per_chunk)
                first, last = int(col_lo[col0:col1].min()), int(col_hi[col0:col1].max())
                # Level column ``first`` in level-0 px: exact when the level's downsample is whole (levels
                # 0, 2^k); otherwise OpenSlide places the chunk with sub-pixel interpolation (as it
                # already did for the bands' rows), so columns near a chunk seam may differ by a grey level.
                chunk = self._read_rgb((round(first * level_downsample), y0_level0), level,
                                       (last - first, band_height_level), what="thumbnail")
                across = (col_lo[col0:col1] - first, col_hi[col0:col1] - first, col_kk[col0:col1])
                passes = [(across, 1), ((row_lo, row_hi, row_kk), 0)]
                if not _pil_resizes_columns_first(level_width, band_height_level, cols, row1 - row0):
                    passes.reverse()
                for (lo, hi, kk), axis in passes:
                    chunk = _box_resize_axis(chunk, lo, hi, kk, axis=axis)
                out[row0:row1, col0:col1] = chunk
        return out

    def read_box(self, box: Level0Box, out_px: tuple[int, int] | None = None) -> np.ndarray:
        """Pixels of a level-0 box as (h, w, 3) uint8. With ``out_px=(width, height)`` the box is read from the
        coarsest level still at least as fine as the target, then resized (area average), so a 20x read
        from a 40x slide without a 20x level comes out right."""
        if box.width <= 0 or box.height <= 0:
            raise SlideError(self.path, f"empty region requested: {box}")
        if out_px is None:
            return self._read_rgb((box.x0, box.y0), 0, (box.width, box.height), what=f"region {box.as_tuple()}")
        out_width, out_height = out_px
        if out_width <= 0 or out_height <= 0:
            raise SlideError(self.path, f"output size must be positive, got {out_px}")
        downsample = min(box.width / out_width, box.height / out_height)
        level = self._osr.get_best_level_for_downsample(max(1.0, downsample))
        level_downsample = self.info.level_downsamples[level]
        size_level = (max(1, round(box.width / level_downsample)), max(1, round(box.height / level_downsample)))
        region = self._read_rgb((box.x0, box.y0), level, size_level, what=f"region {box.as_tuple()}")
        if size_level == (out_width, out_height):
            return region
        return np.asarray(Image.fromarray(region).resize((out_width, out_height), Image.Resampling.BOX))

    def read_boxes(self, boxes: Sequence[Level0Box], out_px: tuple[int, int] | None = None,
                   threads: int = READ_THREADS) -> np.ndarray:
        """``read_box`` of each box, stacked (n, h, w, 3); read side by side on ``threads`` threads, since
        decoding releases the GIL (a paper-size slide's 10 tiles of 2048² are ~42 MP to decode)."""
        def read(box: Level0Box) -> np.ndarray:
            return self.read_box(box, out_px)

        if threads <= 1 or len(boxes) <= 1:
            return _stacked(map(read, boxes), len(boxes))
        with ThreadPoolExecutor(min(threads, len(boxes)), thread_name_prefix="read_boxes") as pool:
            return _stacked(pool.map(read, boxes), len(boxes))

    def read_box_at_magnification(self, box: Level0Box, magnification: float) -> np.ndarray:
        """The level-0 box rendered at ``magnification`` (e.g. 20 from a 40x slide)."""
        if magnification <= 0:
            raise SlideError(self.path, f"magnification must be positive, got {magnification}")
        scale = magnification / self.info.objective_power
        out_px = (max(1, round(box.width * scale)), max(1, round(box.height * scale)))
        return self.read_box(box, out_px)

    def close(self) -> None:
        self._osr.close()
        if self._tiff_tiles is not None:
            self._tiff_tiles.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({self.path!r}, {self.dimensions[0]}x{self.dimensions[1]}, {self.info.vendor})"

    def _read_rgb(self, location_level0: tuple[int, int], level: int, size: tuple[int, int], what: str) -> np.ndarray:
        fast = self._read_tiff_tiles(location_level0, level, size)
        if fast is not None:
            return fast
        try:
            rgba = self._osr.read_region(location_level0, level, size)
        except openslide.OpenSlideError as exc:
            raise SlideError(self.path, f"cannot read {what}: {exc}") from None
        except ValueError as exc:  # openslide-python raises ValueError on a closed handle
            raise SlideError(self.path, f"cannot read {what}: {exc}") from None
        return _rgba_to_rgb(rgba)


    def _read_tiff_tiles(self, location_level0: tuple[int, int], level: int, size: tuple[int, int]
                         ) -> np.ndarray | None:
        """The region from the TIFF's own tiles when it starts on a whole level pixel (OpenSlide interpolates
        a location between level pixels, which this reader does not imitate); else ``None``."""
        if self._tiff_tiles is None:
            return None
        downsample = self.info.level_downsamples[level]
        whole = round(downsample)
        if abs(downsample - whole) > 1e-9 or location_level0[0] % whole or location_level0[1] % whole:
            return None
        return self._tiff_tiles.read(level, location_level0[0] // whole, location_level0[1] // whole, *size)


# PIL's 8-bit resampling: coefficients in fixed point with this many fraction bits (Resample.c).
_PIL_PRECISION_BITS = 32 - 8 - 2


def _box_coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PIL's BOX filter resizing ``in_size`` pixels to ``out_size`` along one axis, as PIL computes it
    (``precompute_coeffs`` and ``normalize_coeffs_8bpc`` in Resample.c, the same double arithmetic):
    output pixel j averages input pixels [lo[j], hi[j]), each with the fixed-point weight kk[j]. The box
    weights are all 1 or 0, so one weight per output pixel describes the row exactly."""
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    ss = 1.0 / filterscale  # PIL multiplies by the reciprocal; dividing can round differently
    lo = np.empty(out_size, dtype=np.int64)
    hi = np.empty(out_size, dtype=np.int64)
    kk = np.empty(out_size, dtype=np.int64)
    for j in range(out_size):
        center = (j + 0.5) * scale
        xmin = max(0, int(center - support + 0.5))
        xmax = min(in_size, int(center + support + 0.5))
        inside = [x for x in range(xmin, xmax) if -0.5 < (x - center + 0.5) * ss <= 0.5]
        if not inside:  # cannot happen for a box of width >= 1 pixel; PIL would write black
            raise ValueError(f"empty box for output pixel {j} ({in_size} -> {out_size})")
        lo[j], hi[j] = inside[0], inside[-1] + 1
        kk[j] = int(0.5 + (1.0 / len(inside)) * (1 << _PIL_PRECISION_BITS))
    return lo, hi, kk


def _pil_resizes_columns_first(in_width: int, in_height: int, out_width: int, out_height: int) -> bool:
    """Whether PIL's two-pass resize narrows the rows (horizontal pass) before it shortens the columns.
    Each pass rounds to 8 bits, so the order shows in the pixels. Pillow 13 goes horizontal first exactly
    when 2 * (in_width - out_width) >= in_height - out_height (found by comparing both orders with
    ``Image.resize`` on random sizes; ``tests/test_thumbnail_chunks.py`` checks it against the installed
    Pillow)."""
    return 2 * (in_width - out_width) >= in_height - out_height


def _box_resize_axis(pixels: np.ndarray, lo: np.ndarray, hi: np.ndarray, kk: np.ndarray, axis: int) -> np.ndarray:
    """One pass of PIL's 8-bit BOX resize along ``axis`` of a uint8 image with ``_box_coefficients``
    (rounded and clipped like PIL's, so that the two passes, in ``_pil_resizes_columns_first``'s order,
    match PIL's)."""
    pad_shape = list(pixels.shape)
    pad_shape[axis] = 1
    padded = np.concatenate([pixels, np.zeros(pad_shape, dtype=pixels.dtype)], axis=axis)  # hi may be the end
    bounds = np.stack([lo, hi], axis=1).reshape(-1)
    sums = np.add.reduceat(padded, bounds, axis=axis, dtype=np.int64)
    sums = np.take(sums, np.arange(0, len(bounds), 2), axis=axis)  # [lo, hi) sums; odd entries span gaps
    weight_shape = [1] * pixels.ndim
    weight_shape[axis] = len(kk)
    fixed = sums * kk.reshape(weight_shape) + (1 << (_PIL_PRECISION_BITS - 1))
    return np.clip(fixed >> _PIL_PRECISION_BITS, 0, 255).astype(np.uint8)


def _rgba_to_rgb(rgba: Image.Image) -> np.ndarray:
    """OpenSlide gives premultiplied RGBA with alpha 0 outside the scanned area: show that as white glass."""
    pixels = np.asarray(rgba)
    rgb = pixels[..., :3].astype(np.uint16)
    alpha = pixels[..., 3:4].astype(np.uint16)
    # premultiplied: colour + (255 - alpha) puts white behind transparent pixels
    return np.clip(rgb + (255 - alpha), 0, 255).astype(np.uint8)


def _slide_info(path: str, osr: openslide.OpenSlide) -> SlideInfo:
    props = osr.properties
    objective = _float_or_none(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
    mpp_x = _float_or_none(props.get(openslide.PROPERTY_NAME_MPP_X))
    mpp_y = _float_or_none(props.get(openslide.PROPERTY_NAME_MPP_Y)) or mpp_x
    low, high = PLAUSIBLE_MPP_RANGE
    mpp_plausible = mpp_x is not None and low <= mpp_x <= high
    if mpp_plausible:
        mpp_source = "file"
    elif objective:
        mpp_x = mpp_y = 10.0 / objective  # a 10x objective images about 1 µm per pixel
        mpp_source = "objective-power"
    else:
        mpp_x = mpp_y = 10.0 / FALLBACK_OBJECTIVE_POWER
        mpp_source = f"default (assumed {FALLBACK_OBJECTIVE_POWER:g}x)"
    if objective:
        objective_source = "file"
    elif mpp_plausible:
        objective = round(10.0 / mpp_x, 1)
        objective_source = "mpp"
    else:
        objective = FALLBACK_OBJECTIVE_POWER
        objective_source = "default"
    return SlideInfo(
        path=path,
        vendor=props.get(openslide.PROPERTY_NAME_VENDOR, "unknown"),
        level_dimensions=tuple(tuple(int(v) for v in d) for d in osr.level_dimensions),
        level_downsamples=tuple(float(d) for d in osr.level_downsamples),
        mpp_x=float(mpp_x),
        mpp_y=float(mpp_y if mpp_plausible else mpp_x),
        mpp_source=mpp_source,
        objective_power=float(objective),
        objective_source=objective_source,
    )


def _float_or_none(value: str | None) -> float | None:
    try:
        number = float(value) if value is not None else None
    except ValueError:
        return None
    return number if number and number > 0 else None


# -- the slide as the soft attention sees it -------------------------------------------------------------------


@dataclass(frozen=True)
class SlideView:
    """A slide at low power: what the soft attention and the sampler see of it."""

    thumbnail: np.ndarray  # (rows, cols, 3) uint8, level 0 at 1/downsample
    tissue_mask: np.ndarray  # (rows, cols) bool, same grid as the thumbnail
    level0_dims: tuple[int, int]  # (width, height) of level 0, px


def slide_view(slide: Slide, downsample: int, min_tissue_area_thumb_px: int,
               timer: StageTimer | None = None) -> SlideView:
    """The one way a slide becomes a thumbnail and a tissue mask (scoring, training's preprocess and cache,
    evaluation, the cohort job, serving); ``timer`` records the ``thumbnail`` and ``tissue_mask`` stages."""
    timer = timer or StageTimer()
    with timer.stage("thumbnail"):
        thumbnail = slide.thumbnail(downsample)
    with timer.stage("tissue_mask"):
        mask = tissue_mask(thumbnail, min_tissue_area_thumb_px)
    width, height = slide.dimensions
    return SlideView(thumbnail, mask, (int(width), int(height)))


def _stacked(arrays: Iterable[np.ndarray], n: int) -> np.ndarray:
    """``np.stack`` of ``n`` same-shaped arrays, each copied into the result as it comes: the tiles are not
    held twice (a paper-size slide's 10 tiles of 2048² are 126 MB)."""
    out: np.ndarray | None = None
    for index, array in enumerate(arrays):
        if out is None:
            out = np.empty((n, *array.shape), dtype=array.dtype)
        elif array.shape != out.shape[1:]:
            raise ValueError(f"all input arrays must have the same shape: {array.shape} != {out.shape[1:]}")
        out[index] = array
    if out is None:
        raise ValueError("need at least one array to stack")
    return out


# -- tissue ------------------------------------------------------------------------------------------------


def tissue_mask(thumbnail_rgb: np.ndarray, min_area_thumb_px: int = 16) -> np.ndarray:
    """Tissue on a thumbnail as a (rows, cols) bool mask.

    Glass is the least absorbing class of the optical density: a three-class Otsu (glass | pale tissue |
    dense tissue) keeps pale stroma that a two-class Otsu would throw away with the glass, falling back to
    two classes where the image has too few levels. Pen ink (green, or saturated blue) and very dark
    regions (black ink, dirt, thick folds) are excluded, then small specks are removed and small holes
    filled.

    Computed in bands of rows (``_MASK_BAND_PX`` pixels each), the Otsu thresholds from the bands' summed
    histogram: the same mask as on the whole image at once (``tests/test_slides.py``), in memory that does
    not grow with the slide (a 3.2-GP slide's 1536 x 2048 thumbnail took 125 MB of float64 temporaries).
    """
    rgb = np.asarray(thumbnail_rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"tissue_mask expects an (h, w, 3) RGB image, got shape {rgb.shape}")
    rows_per_band = max(1, _MASK_BAND_PX // max(1, rgb.shape[1]))
    bands = [slice(row, row + rows_per_band) for row in range(0, rgb.shape[0], rows_per_band)]
    excluded = np.empty(rgb.shape[:2], dtype=bool)
    low, high = np.inf, -np.inf
    for band in bands:  # ink and dirt would otherwise pull the thresholds up
        excluded[band] = _ink_or_dark(rgb[band])
        candidates = _optical_density(rgb[band])[~excluded[band]]
        if candidates.size:
            low, high = min(low, float(candidates.min())), max(high, float(candidates.max()))
    if not low <= high or high - low < 0.05:  # nothing to separate
        return np.zeros(rgb.shape[:2], dtype=bool)
    # skimage's histogram of the candidates (256 bins over their range), summed over the bands.
    counts = np.zeros(_OTSU_BINS, dtype=np.int64)
    for band in bands:
        counts += np.histogram(_optical_density(rgb[band])[~excluded[band]], bins=_OTSU_BINS, range=(low, high))[0]
    edges = np.histogram(np.empty(0), bins=_OTSU_BINS, range=(low, high))[1]
    histogram = (counts, (edges[:-1] + edges[1:]) / 2.0)
    try:
        glass_threshold = filters.threshold_multiotsu(classes=3, hist=histogram)[0]
    except ValueError:  # fewer than three distinct levels
        glass_threshold = filters.threshold_otsu(hist=histogram)
    mask = np.empty(rgb.shape[:2], dtype=bool)
    for band in bands:
        mask[band] = (_optical_density(rgb[band]) > glass_threshold) & ~excluded[band]
    mask = morphology.opening(mask, morphology.disk(1)) if min(mask.shape) > 4 else mask
    mask = _without_small_components(mask, max_size=max(0, min_area_thumb_px - 1), value=True)
    return _without_small_components(mask, max_size=max(1, min_area_thumb_px - 1), value=False)


def _without_small_components(mask: np.ndarray, max_size: int, value: bool) -> np.ndarray:
    """``mask`` with its 4-connected components of ``value`` pixels (True: objects, False: holes) of at most
    ``max_size`` pixels flipped: skimage's ``remove_small_objects`` / ``remove_small_holes`` (connectivity
    1), with int32 labels and sizes counted a band at a time. skimage's labels are int64 and its lookups
    map-sized: 39 MB for a 3.2-GP slide's 1536 x 2048 thumbnail, against 15 MB here (measured)."""
    labels = np.empty(mask.shape, dtype=np.int32)
    count = ndimage.label(mask if value else ~mask, output=labels)
    rows_per_band = max(1, _MASK_BAND_PX // max(1, mask.shape[1]))
    bands = [slice(row, row + rows_per_band) for row in range(0, mask.shape[0], rows_per_band)]
    sizes = np.zeros(count + 1, dtype=np.int64)
    for band in bands:
        sizes += np.bincount(labels[band].ravel(), minlength=count + 1)
    small = sizes <= max_size
    small[0] = False  # label 0: the other value
    out = mask.copy()
    for band in bands:
        out[band][small[labels[band]]] = not value
    return out


_MASK_BAND_PX = 1 << 17  # thumbnail pixels per band of tissue_mask (its float64 temporaries: ~3 MB each)
_OTSU_BINS = 256  # skimage's default
# Optical density of one 8-bit channel value (glass 255 -> 0), as -log(clip(v, 1, 255) / 255).
_OD_OF_VALUE = -np.log(np.clip(np.arange(256, dtype=np.float64), 1.0, 255.0) / 255.0)


def _optical_density(rgb: np.ndarray) -> np.ndarray:
    """(rows, cols) float64: the optical density summed over the three channels, by table."""
    return _OD_OF_VALUE[rgb[..., 0]] + _OD_OF_VALUE[rgb[..., 1]] + _OD_OF_VALUE[rgb[..., 2]]


def _ink_or_dark(rgb: np.ndarray) -> np.ndarray:
    """(rows, cols) bool: pen ink (green, or saturated blue) or very dark, by skimage's HSV. HSV is computed
    only for pixels that could qualify (saturation > 0.24 or value < 53/255, found in integers): every ink
    test needs saturation > 0.25 and the dark test value < 0.2, so the others are exactly False. The whole
    image's ``rgb2hsv`` was 0.5 CPU-s of a 3.2-GP slide's 1536 x 2048 thumbnail (measured)."""
    channel_max = rgb.max(axis=-1).astype(np.int32)
    channel_min = rgb.min(axis=-1).astype(np.int32)
    candidates = ((channel_max - channel_min) * 100 > 24 * channel_max) | (channel_max <= 52)
    excluded = np.zeros(rgb.shape[:2], dtype=bool)
    if candidates.any():
        hsv = color.rgb2hsv(rgb[candidates][:, None, :])[:, 0, :]
        hue_deg, saturation, value = hsv[:, 0] * 360.0, hsv[:, 1], hsv[:, 2]
        green_ink = (hue_deg > 70) & (hue_deg < 190) & (saturation > 0.25)
        blue_ink = (hue_deg >= 190) & (hue_deg < 250) & (saturation > 0.6)
        excluded[candidates] = green_ink | blue_ink | (value < 0.2)
    return excluded


def _ink_or_dark_whole_image(rgb: np.ndarray) -> np.ndarray:
    """``_ink_or_dark`` by the whole image's HSV: the reference the tests hold it to."""
    hsv = color.rgb2hsv(rgb)
    hue_deg, saturation, value = hsv[..., 0] * 360.0, hsv[..., 1], hsv[..., 2]
    green_ink = (hue_deg > 70) & (hue_deg < 190) & (saturation > 0.25)
    blue_ink = (hue_deg >= 190) & (hue_deg < 250) & (saturation > 0.6)
    return green_ink | blue_ink | (value < 0.2)


def _tissue_mask_whole_image(thumbnail_rgb: np.ndarray, min_area_thumb_px: int = 16) -> np.ndarray:
    """``tissue_mask`` on the whole image at once, as it was computed before the bands: the reference the
    tests hold it to.

    Glass is the least absorbing class of the optical density: a three-class Otsu (glass | pale tissue |
    dense tissue) keeps pale stroma that a two-class Otsu would throw away with the glass, falling back to
    two classes where the image has too few levels. Pen ink (green, or saturated blue) and very dark
    regions (black ink, dirt, thick folds) are excluded, then small specks are removed and small holes
    filled.
    """
    rgb = np.asarray(thumbnail_rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"tissue_mask expects an (h, w, 3) RGB image, got shape {rgb.shape}")
    excluded = _ink_or_dark_whole_image(rgb)
    optical_density = -np.log(np.clip(rgb.astype(np.float64), 1.0, 255.0) / 255.0).sum(axis=-1)
    candidates = optical_density[~excluded]  # ink and dirt would otherwise pull the thresholds up
    if candidates.size == 0 or float(candidates.max() - candidates.min()) < 0.05:  # nothing to separate
        return np.zeros(optical_density.shape, dtype=bool)
    try:
        glass_threshold = filters.threshold_multiotsu(candidates, classes=3)[0]
    except ValueError:  # fewer than three distinct levels
        glass_threshold = filters.threshold_otsu(candidates)
    mask = (optical_density > glass_threshold) & ~excluded
    mask = morphology.opening(mask, morphology.disk(1)) if min(mask.shape) > 4 else mask
    mask = morphology.remove_small_objects(mask, max_size=max(0, min_area_thumb_px - 1))
    return morphology.remove_small_holes(mask, max_size=max(1, min_area_thumb_px - 1))


# -- coordinates ---------------------------------------------------------------------------------------------


def thumb_to_level0_box(
    center_thumb_rc: tuple[float, float],
    downsample: int,
    tile_level0_px: int,
    level0_dims: tuple[int, int],
) -> Level0Box:
    """A square level-0 tile centred on the centre of thumbnail pixel (row, col), shifted inside the slide."""
    row, col = center_thumb_rc
    width, height = level0_dims
    center_x, center_y = thumb_rc_to_level0_xy(row, col, downsample)
    x0 = int(round(center_x - tile_level0_px / 2))
    y0 = int(round(center_y - tile_level0_px / 2))
    x0 = max(0, min(x0, width - tile_level0_px))
    y0 = max(0, min(y0, height - tile_level0_px))
    return Level0Box(x0, y0, tile_level0_px, tile_level0_px)


def thumb_rc_to_level0_xy(row: Any, col: Any, downsample: int) -> tuple[Any, Any]:
    """The centre mapping: thumbnail pixel (row, col), fractional allowed, -> the level-0 (x, y) of its
    centre; scalars or numpy arrays (contours on the thumbnail are mapped with it)."""
    return ((col + 0.5) * downsample, (row + 0.5) * downsample)


def level0_to_thumb_rc(x_level0: float, y_level0: float, downsample: int) -> tuple[float, float]:
    """Inverse of the centre mapping: the (fractional) thumbnail (row, col) whose centre is this point."""
    return (y_level0 / downsample - 0.5, x_level0 / downsample - 0.5)


# -- open-handle cache -----------------------------------------------------------------------------------------


class SlideHandleCache:
    """A bounded LRU of open slides, safe to use from several threads.

    An evicted slide is not closed explicitly: a thread may still be reading it. openslide-python closes
    the handle when the last reference goes, so eviction is safe and the number of handles stays near
    ``max_open``.
    """

    def __init__(self, max_open: int = 8) -> None:
        if max_open < 1:
            raise ValueError(f"max_open must be >= 1, got {max_open}")
        self.max_open = max_open
        self._slides: OrderedDict[str, Slide] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str | Path) -> Slide:
        key = str(path)
        with self._lock:
            slide = self._slides.get(key)
            if slide is not None:
                self._slides.move_to_end(key)
                return slide
        slide = open_slide(key)  # outside the lock: opening can be slow
        with self._lock:
            existing = self._slides.get(key)
            if existing is not None:
                return existing
            self._slides[key] = slide
            while len(self._slides) > self.max_open:
                self._slides.popitem(last=False)
            return slide

    def evict(self, path: str | Path) -> None:
        """Forget a slide (e.g. after a read error left its handle unusable)."""
        with self._lock:
            self._slides.pop(str(path), None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._slides)

    def close_all(self) -> None:
        with self._lock:
            self._slides.clear()


def read_tumour_mask(path: str | Path, shape_rc: tuple[int, int]) -> np.ndarray:
    """A tumour mask image (non-zero = tumour, at the thumbnail's downsample) as a bool (rows, cols) array
    of ``shape_rc``, resized by nearest neighbour when its size differs by rounding. Raises ``SlideError``
    naming the file when it cannot be read."""
    try:
        with Image.open(path) as image:
            mask = image.convert("L")
            if mask.size != (shape_rc[1], shape_rc[0]):
                mask = mask.resize((shape_rc[1], shape_rc[0]), Image.Resampling.NEAREST)
            return np.asarray(mask) > 0
    except (OSError, ValueError) as error:
        raise SlideError(path, f"tumour mask cannot be read ({type(error).__name__}: {error})") from error
