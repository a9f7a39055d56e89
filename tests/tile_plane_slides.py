"""Small pyramidal test slides for the tile-plane tests (tiled JPEG, one page per level, mpp from resolution).

Stands in for ``dual_attention.synthetic.write_synthetic_slide`` where a test needs only readable pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image


def write_test_pyramid(
    path: Path, width_level0_px: int, height_level0_px: int, seed: int, mpp: float = 0.25, n_levels: int = 3
) -> Path:
    """A slide whose level 0 is smooth colour gradients plus seeded blobs (JPEG-friendly, not flat), with
    ``n_levels`` levels at downsamples 1, 2, 4, ...; mpp 0.25 makes OpenSlide report a 40x slide."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height_level0_px, 0:width_level0_px].astype(np.float32)
    image = np.empty((height_level0_px, width_level0_px, 3), dtype=np.float32)
    for channel in range(3):
        fx, fy = rng.uniform(2, 12, size=2)
        image[..., channel] = 150 + 80 * np.sin(xx / width_level0_px * fx + channel) * np.cos(yy / height_level0_px * fy)
    for _ in range(12):
        cx, cy = rng.uniform(0, width_level0_px), rng.uniform(0, height_level0_px)
        radius = rng.uniform(0.03, 0.12) * min(width_level0_px, height_level0_px)
        blob = (xx - cx) ** 2 + (yy - cy) ** 2 < radius**2
        image[blob] = rng.uniform(40, 200, size=3)
    level0 = np.clip(image, 0, 255).astype(np.uint8)
    resolution_per_cm = 1e4 / mpp
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        for level in range(n_levels):
            factor = 2**level
            pixels = level0 if level == 0 else np.asarray(
                Image.fromarray(level0).resize(
                    (max(1, width_level0_px // factor), max(1, height_level0_px // factor)), Image.Resampling.BOX
                )
            )
            tif.write(
                pixels,
                tile=(256, 256),
                compression="jpeg",
                photometric="rgb",
                subfiletype=0 if level == 0 else 1,
                resolution=(resolution_per_cm / factor, resolution_per_cm / factor),
                resolutionunit="CENTIMETER",
            )
    return path
