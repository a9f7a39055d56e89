"""Synthetic IHC cohort: pyramidal JPEG-tiled TIFF slides that OpenSlide opens, plus a Parquet manifest.

A slide is drawn procedurally from a seeded *layout* (``SlideLayout``): coarse fields at 1/32 of level 0
say where tissue, tumour and lymphocyte aggregates are; cells sit on a jittered 16-px grid whose jitter
and attributes come from an integer hash of the cell's global index, so any level-0 region can be
rendered on its own, in any order, with identical pixels (that is what makes streaming possible);
sparse objects (brown debris specks, red blood cells, bubbles, pen strokes, tissue folds) are short
lists in level-0 coordinates.

Colour follows Beer-Lambert: stain concentrations times optical-density vectors (haematoxylin and DAB
from scikit-image's ``rgb_from_hed``, so ``skimage.color.rgb2hed`` recovers them), ``rgb = white *
exp(-OD)``.

The label lives in high-power detail only:

* HER2 (0, 1+, 2+, 3+): DAB on tumour-cell membranes, graded by intensity and by completeness of the
  ring (1+ faint and broken, 2+ moderate and complete, 3+ strong, thick and complete). Per-slide random
  cytoplasmic DAB blush, brown debris, tumour fraction and stain strength make the thumbnail's colour
  overlap across classes (``benchmarks/bench_thumbnail_baseline.py`` measures it).
* MMR (0 intact, 1 loss): DAB in tumour nuclei (intact) or haematoxylin only (loss); non-tumour nuclei
  (stroma, lymphocytes) are brown in both, as the internal positive control.

Writing streams: level 0 is rendered one strip of tiles at a time; each strip is downsampled 2x into a
temporary file that feeds the next level, so memory stays bounded by a strip (width x tile rows), never
a level.

What OpenSlide sees: each level is a tiled JPEG page in the main IFD chain (largest first, reduced levels
``subfiletype=1``), mpp 0.25 from the resolution tags. Level 0 carries an Aperio-style ImageDescription
(``AppMag = 40|MPP = 0.25``), so OpenSlide opens the file with its aperio driver (vendor ``aperio``) and
reports ``openslide.objective-power`` = 40; its generic-tiff driver never reports an objective power
(``objective_power=None`` / ``--plain-tiff`` writes such a file: vendor ``generic-tiff``, mpp only).
"""


from __future__ import annotations

from dual_attention.synthetic.cohort import (
    cohort_summary,
    main,
    plan_cohort,
    slide_seed,
    write_cohort,
    write_synthetic_slide,
)
from dual_attention.synthetic.layout import (
    CELL_PX,
    FIELD_PX,
    HER2_MEMBRANE,
    MPP_40X,
    OBJECTIVE_POWER,
    RENDER_CHUNK_PX,
    TILE_PX,
    Discs,
    SlideLayout,
    Stroke,
    SyntheticError,
    make_layout,
)
from dual_attention.synthetic.pyramid import (
    JPEG_QUALITY,
    SMALLEST_LEVEL_PX,
    RenderStrip,
    write_pyramid,
)
from dual_attention.synthetic.render import (
    CELL_LYMPHOCYTE,
    CELL_NONE,
    CELL_STROMA,
    CELL_TUMOUR,
    render_region,
)

__all__ = [
    "CELL_LYMPHOCYTE",
    "CELL_NONE",
    "CELL_STROMA",
    "CELL_TUMOUR",
    "CELL_PX",
    "Discs",
    "FIELD_PX",
    "HER2_MEMBRANE",
    "JPEG_QUALITY",
    "MPP_40X",
    "OBJECTIVE_POWER",
    "RENDER_CHUNK_PX",
    "RenderStrip",
    "SMALLEST_LEVEL_PX",
    "SlideLayout",
    "Stroke",
    "SyntheticError",
    "TILE_PX",
    "cohort_summary",
    "main",
    "make_layout",
    "plan_cohort",
    "render_region",
    "slide_seed",
    "write_cohort",
    "write_pyramid",
    "write_synthetic_slide",
]
