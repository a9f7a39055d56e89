"""Preprocessing job: cached thumbnails and tissue masks keyed by slide identity and parameters; a bad slide
is reported, not fatal; exit status tells partial success."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dual_attention.config import preset
from dual_attention.manifest import read_manifest, write_manifest
from dual_attention.slides import SlideError, open_slide, tissue_mask
from dual_attention.synthetic import write_cohort, write_synthetic_slide
from jobs import preprocess
from jobs.preprocess import ThumbnailParams, load_or_compute_thumbnail, preprocess_manifest, thumbnail_entry


@pytest.fixture(scope="module")
def cohort_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four small synthetic slides (one per HER2 class)."""
    out = tmp_path_factory.mktemp("cohort")
    return write_cohort(out, "her2", n_slides=4, seed=3, slide_level0_px=1024, workers=1, progress=False)


@pytest.fixture(scope="module")
def manifest_with_broken_slide(cohort_manifest: Path, shared_slides: Path) -> Path:
    rows = read_manifest(cohort_manifest).to_pylist()
    broken = dict(rows[0], slide_id="broken-0", path=str(shared_slides / "broken" / "unreadable.svs"))
    path = cohort_manifest.parent / "with_broken.parquet"
    write_manifest([*rows, broken], path)
    return path


def test_cached_thumbnail_equals_fresh_and_is_keyed_by_identity_and_params(tmp_path: Path) -> None:
    slide_path = tmp_path / "slide.tiff"
    write_synthetic_slide(slide_path, "her2", label=3, seed=11, width_level0_px=1024, height_level0_px=768)
    config = preset("cpu-small")
    cache = tmp_path / "cache"

    first = thumbnail_entry(slide_path, config, cache)
    assert not first.from_cache and first.cache_file and Path(first.cache_file).is_file()
    with open_slide(slide_path) as slide:
        expected_thumbnail = slide.thumbnail(32)
    np.testing.assert_array_equal(first.thumbnail, expected_thumbnail)
    np.testing.assert_array_equal(first.tissue_mask, tissue_mask(expected_thumbnail, 4))
    assert first.thumbnail.shape == (24, 32, 3) and first.level0_dims == (1024, 768)

    second = thumbnail_entry(slide_path, config, cache)
    assert second.from_cache and second.cache_file == first.cache_file
    np.testing.assert_array_equal(second.thumbnail, first.thumbnail)
    np.testing.assert_array_equal(second.tissue_mask, first.tissue_mask)
    assert second.tissue_mask.dtype == bool and second.level0_dims == (1024, 768)

    # other parameters: another entry
    other = thumbnail_entry(slide_path, config.with_overrides({"slide.thumbnail_downsample": 16}), cache)
    assert not other.from_cache and other.cache_file != first.cache_file and other.thumbnail.shape == (48, 64, 3)
    # the slide changed (new mtime): recomputed, not served stale
    stat = slide_path.stat()
    os.utime(slide_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert not thumbnail_entry(slide_path, config, cache).from_cache
    # a corrupt cache entry is recomputed
    latest = thumbnail_entry(slide_path, config, cache)
    assert latest.from_cache
    Path(latest.cache_file).write_bytes(b"not an npz")
    recomputed = thumbnail_entry(slide_path, config, cache)
    assert not recomputed.from_cache
    np.testing.assert_array_equal(recomputed.thumbnail, expected_thumbnail)

    thumbnail, mask, dims = load_or_compute_thumbnail(slide_path, config, cache)
    np.testing.assert_array_equal(thumbnail, expected_thumbnail)
    assert mask.shape == thumbnail.shape[:2] and dims == (1024, 768)


def test_bad_slide_raises_slide_error_and_caches_nothing(tmp_path: Path, shared_slides: Path) -> None:
    for name in ("unreadable.svs", "unopenable.tiff", "histolab-broken.svs"):
        path = shared_slides / "broken" / name
        with pytest.raises(SlideError) as raised:
            load_or_compute_thumbnail(path, ThumbnailParams(32, 4), tmp_path)
        assert raised.value.path == str(path) and name in str(raised.value)
    with pytest.raises(SlideError, match="missing.tiff"):
        load_or_compute_thumbnail(tmp_path / "missing.tiff", ThumbnailParams(32, 4), tmp_path)
    assert not (tmp_path / "thumbnails").exists() or not any((tmp_path / "thumbnails").iterdir())


def test_manifest_with_broken_slide_is_partial_success(
    ray_cluster: None, manifest_with_broken_slide: Path, tmp_path: Path, shared_slides: Path
) -> None:
    config = preset("cpu-small")
    cache = tmp_path / "cache"
    report = preprocess_manifest(manifest_with_broken_slide, cache, config, progress=False)
    assert report.exit_status == preprocess.EXIT_PARTIAL
    assert report.n_ok == 4 and len(report.rows) == 5
    (failed,) = report.failed
    assert failed["slide_id"] == "broken-0" and failed["path"].endswith("unreadable.svs") and failed["error"]
    manifest_paths = read_manifest(manifest_with_broken_slide).column("path").to_pylist()
    for row, path in zip(report.rows[:4], manifest_paths[:4], strict=True):
        assert row["status"] == "ok" and not row["from_cache"] and row["path"] == path
        cached = np.load(row["cache_file"])
        np.testing.assert_array_equal(cached["thumbnail"], open_slide(path).thumbnail(32))
    # the report lies next to the cache, in both forms
    table = pq.read_table(cache / "preprocess_report.parquet")
    assert table.num_rows == 5 and table.column("status").to_pylist().count("failed") == 1
    summary = json.loads((cache / "preprocess_report.json").read_text())
    assert summary["n_ok"] == 4 and summary["exit_status"] == 3
    assert summary["failed"][0]["path"] == str(shared_slides / "broken" / "unreadable.svs")
    # a second run finds every good slide in the cache
    again = preprocess_manifest(manifest_with_broken_slide, cache, config, progress=False)
    assert [row["from_cache"] for row in again.rows] == [True, True, True, True, False]


def test_preprocess_slides_returns_arrays_in_order(ray_cluster: None, cohort_manifest: Path, shared_slides: Path,
                                                   tmp_path: Path) -> None:
    paths = read_manifest(cohort_manifest).column("path").to_pylist()
    mixed = [paths[0], str(shared_slides / "broken" / "histolab-broken.svs"), paths[1]]
    results = preprocess.preprocess_slides(mixed, preset("cpu-small"), tmp_path, progress=False)
    assert [r.path for r in results] == mixed
    assert isinstance(results[1].error, SlideError) and results[1].error.path == mixed[1]
    for index in (0, 2):
        expected = load_or_compute_thumbnail(mixed[index], preset("cpu-small"), None)
        np.testing.assert_array_equal(results[index].thumbnail, expected[0])
        np.testing.assert_array_equal(results[index].tissue_mask, expected[1])
        assert results[index].level0_dims == expected[2] == (1024, 1024)


def test_cli_exit_status_all_partial_none(
    ray_cluster: None, cohort_manifest: Path, manifest_with_broken_slide: Path, shared_slides: Path,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    assert preprocess.main([str(cohort_manifest), "--cache-dir", str(tmp_path / "a"), "--quiet"]) == 0
    assert preprocess.main([str(manifest_with_broken_slide), "--cache-dir", str(tmp_path / "b"), "--quiet"]) == 3
    captured = capsys.readouterr()
    assert "4/5 slides preprocessed" in captured.out
    assert "FAILED broken-0" in captured.err and "unreadable.svs" in captured.err
    only_broken = tmp_path / "only_broken.parquet"
    row = read_manifest(cohort_manifest).to_pylist()[0]
    write_manifest([dict(row, slide_id="bad", path=str(shared_slides / "broken" / "unopenable.tiff"))], only_broken)
    assert preprocess.main([str(only_broken), "--cache-dir", str(tmp_path / "c"), "--quiet"]) == 1
    assert preprocess.main([str(tmp_path / "no_such.parquet"), "--quiet"]) == 1
    assert "no_such.parquet" in capsys.readouterr().err
    assert preprocess.main([str(cohort_manifest), "--set", "slide.no_such_field=1", "--quiet"]) == 2


def test_a_slide_without_tissue_is_reported_as_no_tissue_not_ok(ray_cluster: None, cohort_manifest: Path,
                                                                 tmp_path: Path) -> None:
    import tifffile

    blank = tmp_path / "blank.tiff"  # opens and reads fine, but is white glass only
    tifffile.imwrite(blank, np.full((512, 512, 3), 255, np.uint8), tile=(256, 256), photometric="rgb",
                     compression="zlib")
    rows = read_manifest(cohort_manifest).to_pylist()
    manifest = tmp_path / "with_blank.parquet"
    write_manifest([rows[0], dict(rows[0], slide_id="blank-0", path=str(blank))], manifest)
    report = preprocess_manifest(manifest, tmp_path / "cache", preset("cpu-small"), progress=False)
    statuses = {row["slide_id"]: (row["status"], row["tissue_fraction"], row["error"]) for row in report.rows}
    assert statuses[rows[0]["slide_id"]][:1] == ("ok",) and statuses[rows[0]["slide_id"]][1] > 0
    status, fraction, error = statuses["blank-0"]
    assert (status, fraction) == ("no tissue", 0.0) and "no tissue" in error
    assert report.n_ok == 1 and report.n_no_tissue == 1 and report.exit_status == preprocess.EXIT_PARTIAL
    assert "0 failed, 1 without tissue" in report.summary()
    summary = json.loads((tmp_path / "cache" / "preprocess_report.json").read_text())
    assert summary["n_no_tissue"] == 1 and summary["failed"][0]["status"] == "no tissue"
