"""The cohort manifest: round trip, path resolution, and errors that name the file and the column."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dual_attention.manifest import ManifestError, ManifestRow, manifest_rows, read_manifest, write_manifest


def _rows() -> list[ManifestRow]:
    return [
        ManifestRow("a", "slides/a.tiff", 0, "her2", 0, 1, tumour_mask_path="masks/a.png"),
        ManifestRow("b", "/abs/b.tiff", 3, "her2", 1, 2, tumour_mask_path="masks/b.png"),
    ]


def test_round_trip_resolves_relative_paths_against_the_manifest_folder(tmp_path: Path, monkeypatch) -> None:
    path = write_manifest(_rows(), tmp_path / "cohort" / "manifest.parquet")
    monkeypatch.chdir(tmp_path)  # resolution must not depend on the working directory
    table = read_manifest(path)
    assert table.column_names[:6] == ["slide_id", "path", "label", "task", "fold", "seed"]
    assert table.column("path").to_pylist() == [str((tmp_path / "cohort" / "slides" / "a.tiff").resolve()), "/abs/b.tiff"]
    assert table.column("tumour_mask_path").to_pylist()[0] == str((tmp_path / "cohort" / "masks" / "a.png").resolve())
    assert table.column("label").to_pylist() == [0, 3]
    rows = manifest_rows(path)
    assert rows[1].slide_id == "b" and rows[1].fold == 1 and Path(rows[0].path).is_absolute()


def test_plain_dict_rows_are_accepted(tmp_path: Path) -> None:
    rows = [{"slide_id": "x", "path": "x.svs", "label": 1, "task": "mmr", "fold": 0, "seed": 0}]
    table = read_manifest(write_manifest(rows, tmp_path / "m.parquet"))
    assert table.num_rows == 1 and "tumour_mask_path" not in table.column_names


@pytest.mark.parametrize("missing", ["slide_id", "path", "label", "task", "fold", "seed"])
def test_missing_column_is_named_with_the_file(tmp_path: Path, missing: str) -> None:
    data = {"slide_id": ["a"], "path": ["a.tiff"], "label": [0], "task": ["her2"], "fold": [0], "seed": [1]}
    del data[missing]
    path = tmp_path / "broken.parquet"
    pq.write_table(pa.table(data), path)
    with pytest.raises(ManifestError) as caught:
        read_manifest(path)
    assert f"'{missing}'" in str(caught.value)
    assert str(path) in str(caught.value)


def test_missing_file_and_non_parquet_are_named(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="nope.parquet.*not found"):
        read_manifest(tmp_path / "nope.parquet")
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(ManifestError, match="junk.parquet.*not a readable Parquet"):
        read_manifest(junk)


def test_bad_values_are_named(tmp_path: Path) -> None:
    base = {"slide_id": ["a", "b"], "path": ["a", "b"], "label": [0, 1], "task": ["mmr", "mmr"], "fold": [0, 0],
            "seed": [1, 2]}
    cases = {
        "label": ({**base, "label": [0, 2]}, "'label' is 2, outside 0..1"),
        "task": ({**base, "task": ["mmr", "pdl1"]}, "'task' is 'pdl1'"),
        "duplicate": ({**base, "slide_id": ["a", "a"]}, "'slide_id' repeats 'a'"),
        "null": ({**base, "path": ["a", None]}, "'path' has 1 empty"),
        "float fold": ({**base, "fold": [0.0, 1.0]}, "'fold' must be integer"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.parquet"
        pq.write_table(pa.table(data), path)
        with pytest.raises(ManifestError, match=message):
            read_manifest(path)


def test_write_refuses_rows_without_required_columns(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="row 0 lacks required column 'fold'"):
        write_manifest([{"slide_id": "a", "path": "a", "label": 0, "task": "her2", "seed": 0}], tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match="no rows"):
        write_manifest([], tmp_path / "m.parquet")
