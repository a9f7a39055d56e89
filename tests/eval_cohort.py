"""A tiny HER2 cohort for the evaluation and baseline tests: four 1024² synthetic slides and a broken one."""

from __future__ import annotations

from pathlib import Path

from dual_attention.manifest import ManifestRow, write_manifest


def write_tiny_her2_cohort(root: Path, broken_slide: Path) -> Path:
    """Slides s0..s3 with labels 0..3 (folds s0, s2 -> 0; s1, s3 -> 1) and ``broken`` (fold 0, label 2)
    pointing at a real unreadable file. Returns the manifest path."""
    from dual_attention.synthetic import write_synthetic_slide

    rows = []
    for label in range(4):
        path = root / "slides" / f"s{label}.tiff"
        write_synthetic_slide(path, "her2", label, seed=100 + label, width_level0_px=1024, height_level0_px=1024)
        rows.append(ManifestRow(f"s{label}", f"slides/s{label}.tiff", label, "her2", fold=label % 2, seed=100 + label))
    rows.append(ManifestRow("broken", str(broken_slide), 2, "her2", fold=0, seed=0))
    return write_manifest(rows, root / "manifest.parquet")
