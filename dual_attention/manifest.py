"""The cohort manifest: one Parquet row per slide (slide_id, path, label, task, fold, seed, ...).

Paths in the file may be relative to the manifest's own folder, so that a cohort folder can be moved or
copied as a whole; ``read_manifest`` hands back absolute paths, and every reader of a manifest uses it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dual_attention.config import NUM_CLASSES

REQUIRED_COLUMNS: tuple[str, ...] = ("slide_id", "path", "label", "task", "fold", "seed")
# What scoring a cohort needs (jobs.score_cohort): an unlabelled list of slides is enough; label, task and
# fold are checked as in a full manifest when present.
SCORING_COLUMNS: tuple[str, ...] = ("slide_id", "path")
# Columns that hold file paths; resolved against the manifest's folder when relative.
PATH_COLUMNS: tuple[str, ...] = ("path", "tumour_mask_path")


class ManifestError(ValueError):
    """A manifest file is missing, unreadable or malformed; the message names the file and the field."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"manifest {self.path}: {reason}")


@dataclass(frozen=True)
class ManifestRow:
    """One slide of a cohort. ``path`` and ``tumour_mask_path`` as written (absolute or relative)."""

    slide_id: str
    path: str
    label: int
    task: str
    fold: int
    seed: int
    tumour_mask_path: str | None = None
    width_level0_px: int | None = None
    height_level0_px: int | None = None
    mpp: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SCHEMA_TYPES: dict[str, pa.DataType] = {
    "slide_id": pa.string(),
    "path": pa.string(),
    "label": pa.int64(),
    "task": pa.string(),
    "fold": pa.int64(),
    "seed": pa.int64(),
    "tumour_mask_path": pa.string(),
    "width_level0_px": pa.int64(),
    "height_level0_px": pa.int64(),
    "mpp": pa.float64(),
}


def write_manifest(rows: Iterable[ManifestRow | Mapping[str, Any]], path: str | Path) -> Path:
    """Write rows (``ManifestRow`` or mappings with at least the required columns) as Parquet."""
    path = Path(path)
    dicts = [row.to_dict() if isinstance(row, ManifestRow) else dict(row) for row in rows]
    if not dicts:
        raise ManifestError(path, "no rows to write")
    columns: list[str] = list(dicts[0])
    for i, row in enumerate(dicts):
        missing = [c for c in REQUIRED_COLUMNS if c not in row]
        if missing:
            raise ManifestError(path, f"row {i} lacks required column '{missing[0]}'")
        if set(row) != set(columns):
            raise ManifestError(path, f"row {i} has columns {sorted(row)}, row 0 has {sorted(columns)}")
    arrays = {}
    for name in columns:
        values = [row[name] for row in dicts]
        arrays[name] = pa.array(values, type=_SCHEMA_TYPES.get(name))
    table = pa.table(arrays)
    _validate(table, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def read_manifest(path: str | Path, required: tuple[str, ...] = REQUIRED_COLUMNS) -> pa.Table:
    """Read and validate a manifest; path columns come back as absolute paths. ``required``: the columns
    that must be there (``SCORING_COLUMNS`` for a list of slides to score); the others are validated
    when present.

    Raises ``ManifestError`` naming the file and the missing column or bad value.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, "file not found")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise ManifestError(path, f"not a readable Parquet file ({error})") from error
    _validate(table, path, required)
    base = path.resolve().parent
    for name in PATH_COLUMNS:
        if name not in table.column_names:
            continue
        resolved = [None if p is None else str(_resolve(base, p)) for p in table.column(name).to_pylist()]
        table = table.set_column(table.column_names.index(name), name, pa.array(resolved, type=pa.string()))
    return table


def manifest_rows(path: str | Path) -> list[ManifestRow]:
    """The manifest as ``ManifestRow`` objects with absolute paths (extra columns are dropped)."""
    known = {f.name for f in dataclasses.fields(ManifestRow)}
    return [ManifestRow(**{k: v for k, v in row.items() if k in known}) for row in read_manifest(path).to_pylist()]


def _resolve(base: Path, value: str) -> Path:
    candidate = Path(value)
    return candidate if candidate.is_absolute() else (base / candidate).resolve()


def _validate(table: pa.Table, path: Path, required: tuple[str, ...] = REQUIRED_COLUMNS) -> None:
    for name in required:
        if name not in table.column_names:
            raise ManifestError(path, f"missing required column '{name}' (has: {', '.join(table.column_names)})")
    if table.num_rows == 0:
        raise ManifestError(path, "has no rows")
    present = [name for name in REQUIRED_COLUMNS if name in table.column_names]
    for name in ("label", "fold", "seed"):
        if name in present and not pa.types.is_integer(table.schema.field(name).type):
            raise ManifestError(path, f"column '{name}' must be integer, got {table.schema.field(name).type}")
    for name in present:
        if table.column(name).null_count:
            raise ManifestError(path, f"column '{name}' has {table.column(name).null_count} empty value(s)")
    slide_ids = table.column("slide_id").to_pylist()
    if len(set(slide_ids)) != len(slide_ids):
        duplicate = next(s for s in slide_ids if slide_ids.count(s) > 1)
        raise ManifestError(path, f"column 'slide_id' repeats '{duplicate}'")
    if "task" not in present:
        return
    tasks = table.column("task").to_pylist()
    labels = table.column("label").to_pylist() if "label" in present else [None] * len(tasks)
    for row, (task, label) in enumerate(zip(tasks, labels, strict=True)):
        if task not in NUM_CLASSES:
            raise ManifestError(path, f"row {row}: column 'task' is '{task}', expected one of {tuple(NUM_CLASSES)}")
        if label is not None and not 0 <= label < NUM_CLASSES[task]:
            raise ManifestError(
                path, f"row {row}: column 'label' is {label}, outside 0..{NUM_CLASSES[task] - 1} for task '{task}'"
            )
