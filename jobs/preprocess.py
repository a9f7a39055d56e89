"""Preprocessing job: a thumbnail and a tissue mask for every slide of a manifest, cached on disk.

``python -m jobs.preprocess MANIFEST --cache-dir DIR`` (also ``dual-attention preprocess``) runs one Ray
task per slide, with a progress bar over completed tasks. A bad slide is listed in a report written next
to the cache (``preprocess_report.parquet`` and ``.json``) and printed; it does not stop the others.
Exit status: 0 every slide done, 3 some slides failed or have no tissue (status "no tissue": read, but
tissue fraction 0), 1 none done (or the manifest is unreadable).

Cache entries are keyed by the slide's identity (absolute path, size, mtime) and by what made the arrays
(thumbnail downsample, tissue-mask parameters, and a fingerprint of the thumbnail and mask code), so a
changed slide or changed parameters never reuse a stale entry. Tiles are never cached.

``load_or_compute_thumbnail`` is the Ray-free entry for one slide (training, evaluation, serving);
``preprocess_slides`` gives the arrays for a list of slides; ``preprocess_manifest`` is the whole job.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from dual_attention import slides as slides_module
from dual_attention.config import ConfigError, DualAttentionConfig, SlideConfig, preset
from dual_attention.manifest import ManifestError, read_manifest
from dual_attention.slides import SlideError, open_slide, slide_view
from jobs.runtime.cluster import RaySession

EXIT_ALL_DONE = 0
EXIT_NONE_DONE = 1
EXIT_PARTIAL = 3
REPORT_STEM = "preprocess_report"
_CACHE_SUBDIR = "thumbnails"
_TASK_NUM_CPUS = 1.0


@dataclass(frozen=True)
class ThumbnailParams:
    """Everything that decides a cached thumbnail and mask besides the slide itself."""

    downsample: int
    tissue_min_area_thumb_px: int

    @classmethod
    def from_config(cls, config: DualAttentionConfig | SlideConfig) -> ThumbnailParams:
        slide_config = config.slide if isinstance(config, DualAttentionConfig) else config
        return cls(slide_config.thumbnail_downsample, slide_config.tissue_min_area_thumb_px)


@dataclass
class ThumbnailResult:
    """One slide's outcome: arrays (when asked for) or the error that stopped it."""

    path: str
    thumbnail: np.ndarray | None
    tissue_mask: np.ndarray | None
    level0_dims: tuple[int, int] | None
    error: SlideError | None
    from_cache: bool = False
    cache_file: str | None = None
    seconds: float = 0.0
    tissue_fraction: float | None = None


# -- one slide, no Ray ----------------------------------------------------------------------------------


def _code_fingerprint() -> str:
    """Changes when the thumbnail or tissue-mask code changes, so the cache never serves an old algorithm."""
    source = inspect.getsource(slides_module.Slide.thumbnail) + inspect.getsource(slides_module.tissue_mask)
    return hashlib.sha256(source.encode()).hexdigest()[:12]


def slide_identity(path: str | Path) -> dict[str, Any]:
    """Absolute path, size and mtime: cheap to take without opening the slide."""
    absolute = os.path.abspath(str(path))
    try:
        stat = os.stat(absolute)
    except OSError as exc:
        raise SlideError(absolute, f"cannot stat file: {exc.strerror or exc}") from None
    return {"path": absolute, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cache_file_for(path: str | Path, params: ThumbnailParams, cache_dir: str | Path) -> Path:
    """Where the thumbnail and mask of this slide, made with these parameters, are cached."""
    identity = slide_identity(path)
    key_source = json.dumps({"slide": identity, "params": asdict(params), "code": _code_fingerprint()}, sort_keys=True)
    key = hashlib.sha256(key_source.encode()).hexdigest()[:20]
    return Path(cache_dir) / _CACHE_SUBDIR / f"{Path(identity['path']).stem}-{key}.npz"


def thumbnail_entry(
    path: str | Path, config: DualAttentionConfig | SlideConfig | ThumbnailParams, cache_dir: str | Path | None
) -> ThumbnailResult:
    """Load one slide's thumbnail and tissue mask from the cache, or compute and cache them.

    Raises ``SlideError`` naming the file when the slide cannot be read; nothing is cached then.
    ``cache_dir=None`` computes without caching.
    """
    started = time.perf_counter()
    params = config if isinstance(config, ThumbnailParams) else ThumbnailParams.from_config(config)
    absolute = os.path.abspath(str(path))
    cache_file = cache_file_for(absolute, params, cache_dir) if cache_dir is not None else None
    if cache_file is not None and cache_file.is_file():
        cached = _load_cache_file(cache_file)
        if cached is not None:
            thumbnail, mask, dims = cached
            return ThumbnailResult(absolute, thumbnail, mask, dims, None, True, str(cache_file),
                                   time.perf_counter() - started, float(mask.mean()))
    with open_slide(absolute) as slide:
        view = slide_view(slide, params.downsample, params.tissue_min_area_thumb_px)
    thumbnail, mask, dims = view.thumbnail, view.tissue_mask, view.level0_dims
    if cache_file is not None:
        _write_cache_file(cache_file, thumbnail, mask, dims)
    return ThumbnailResult(absolute, thumbnail, mask, dims, None, False,
                           str(cache_file) if cache_file else None, time.perf_counter() - started, float(mask.mean()))


def load_or_compute_thumbnail(
    path: str | Path, config: DualAttentionConfig | SlideConfig | ThumbnailParams, cache_dir: str | Path | None
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """``(thumbnail (h, w, 3) uint8, tissue_mask (h, w) bool, level0_dims (w, h))`` of one slide, cached;
    raises ``SlideError`` for a bad slide. No Ray needed."""
    entry = thumbnail_entry(path, config, cache_dir)
    assert entry.thumbnail is not None and entry.tissue_mask is not None and entry.level0_dims is not None
    return entry.thumbnail, entry.tissue_mask, entry.level0_dims


def _load_cache_file(cache_file: Path) -> tuple[np.ndarray, np.ndarray, tuple[int, int]] | None:
    """The cached arrays, or None when the file is unreadable (then it is recomputed and overwritten)."""
    try:
        with np.load(cache_file) as data:
            thumbnail = data["thumbnail"]
            mask = data["tissue_mask"]
            dims = tuple(int(v) for v in data["level0_dims"])
    except (OSError, KeyError, ValueError, EOFError):
        return None
    if thumbnail.ndim != 3 or mask.shape != thumbnail.shape[:2] or len(dims) != 2:
        return None
    return thumbnail, mask.astype(bool), (dims[0], dims[1])


def _write_cache_file(cache_file: Path, thumbnail: np.ndarray, mask: np.ndarray, dims: tuple[int, int]) -> None:
    """Write atomically (temp file + rename), so a reader never sees half an entry and two writers of the
    same entry do not collide."""
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache_file.parent, prefix=".tmp-", suffix=".npz", delete=False) as tmp:
        np.savez_compressed(tmp, thumbnail=thumbnail, tissue_mask=mask, level0_dims=np.asarray(dims, np.int64))
    os.replace(tmp.name, cache_file)


def _entry_or_error(path: str, params: ThumbnailParams, cache_dir: str | None, return_arrays: bool) -> ThumbnailResult:
    """Body of one Ray task: never raises for a bad slide, so the error reaches the report by value."""
    started = time.perf_counter()
    try:
        result = thumbnail_entry(path, params, cache_dir)
    except SlideError as exc:
        return ThumbnailResult(os.path.abspath(path), None, None, None, exc, seconds=time.perf_counter() - started)
    except Exception as exc:  # noqa: BLE001 - a bug or odd file must still fail only this slide
        error = SlideError(os.path.abspath(path), f"unexpected {type(exc).__name__}: {exc}")
        return ThumbnailResult(os.path.abspath(path), None, None, None, error, seconds=time.perf_counter() - started)
    if not return_arrays:
        result.thumbnail = result.tissue_mask = None
    return result


# -- many slides, Ray tasks ---------------------------------------------------------------------------------


def preprocess_slides(
    paths: Sequence[str | Path],
    config: DualAttentionConfig | SlideConfig | ThumbnailParams,
    cache_dir: str | Path | None,
    *,
    return_arrays: bool = True,
    task_num_cpus: float = _TASK_NUM_CPUS,
    max_in_flight: int | None = None,
    progress: bool = True,
) -> list[ThumbnailResult]:
    """One Ray task per slide; results in the order of ``paths``, a bad slide as a result whose ``error``
    is its ``SlideError``. At most ``max_in_flight`` tasks are outstanding (default: twice the CPUs)."""
    import ray
    from ray.exceptions import RayError

    params = config if isinstance(config, ThumbnailParams) else ThumbnailParams.from_config(config)
    cache = None if cache_dir is None else str(cache_dir)
    paths = [os.path.abspath(str(p)) for p in paths]
    results: list[ThumbnailResult | None] = [None] * len(paths)
    with RaySession(log_to_driver=False):
        task = ray.remote(_entry_or_error).options(name="preprocess_slide", num_cpus=task_num_cpus, max_retries=1)
        limit = max_in_flight or max(2, int(2 * ray.cluster_resources().get("CPU", 1) / task_num_cpus))
        pending: dict[Any, int] = {}
        next_index = 0
        with tqdm(total=len(paths), desc="preprocess", unit="slide", disable=not progress) as bar:
            while next_index < len(paths) or pending:
                while next_index < len(paths) and len(pending) < limit:
                    pending[task.remote(paths[next_index], params, cache, return_arrays)] = next_index
                    next_index += 1
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    index = pending.pop(ref)
                    try:
                        results[index] = ray.get(ref)
                    except RayError as exc:  # the worker died (e.g. a crash inside libopenslide)
                        error = SlideError(paths[index], f"worker failed while reading the slide: {exc}")
                        results[index] = ThumbnailResult(paths[index], None, None, None, error)
                    bar.update()
    return [r for r in results if r is not None]


# -- the job: a manifest, a report ------------------------------------------------------------------------------


@dataclass
class PreprocessReport:
    """Per-slide outcomes of a preprocessing run, and where the report files went."""

    rows: list[dict[str, Any]]
    cache_dir: str
    report_files: list[str]

    @property
    def n_ok(self) -> int:
        return sum(row["status"] == "ok" for row in self.rows)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [row for row in self.rows if row["status"] != "ok"]

    @property
    def exit_status(self) -> int:
        if not self.failed:
            return EXIT_ALL_DONE
        return EXIT_PARTIAL if self.n_ok else EXIT_NONE_DONE

    @property
    def n_no_tissue(self) -> int:
        return sum(row["status"] == "no tissue" for row in self.rows)

    def summary(self) -> str:
        from_cache = sum(bool(row["from_cache"]) for row in self.rows)
        return (f"{self.n_ok}/{len(self.rows)} slides preprocessed ({from_cache} from cache), "
                f"{len(self.failed) - self.n_no_tissue} failed, {self.n_no_tissue} without tissue; "
                f"cache {self.cache_dir}")


def preprocess_manifest(
    manifest_path: str | Path,
    cache_dir: str | Path,
    config: DualAttentionConfig | SlideConfig | ThumbnailParams,
    *,
    task_num_cpus: float = _TASK_NUM_CPUS,
    progress: bool = True,
) -> PreprocessReport:
    """Thumbnail and tissue mask for every slide of the manifest, cached under ``cache_dir``; the report
    (``preprocess_report.parquet`` / ``.json`` in ``cache_dir``) lists every slide and why a bad one failed.
    Raises ``ManifestError`` when the manifest itself cannot be read."""
    table = read_manifest(manifest_path)
    slide_ids = [str(s) for s in table.column("slide_id").to_pylist()]
    paths = table.column("path").to_pylist()
    results = preprocess_slides(paths, config, cache_dir, return_arrays=False, task_num_cpus=task_num_cpus,
                                progress=progress)
    rows = [
        {
            "slide_id": slide_id,
            "path": result.path,
            "status": _status(result),
            "error": _error(result),
            "from_cache": result.from_cache,
            "cache_file": result.cache_file,
            "level0_width": result.level0_dims[0] if result.level0_dims else None,
            "level0_height": result.level0_dims[1] if result.level0_dims else None,
            "tissue_fraction": result.tissue_fraction,
            "seconds": round(result.seconds, 4),
        }
        for slide_id, result in zip(slide_ids, results, strict=True)
    ]
    report = PreprocessReport(rows, str(Path(cache_dir).resolve()), [])
    report.report_files = _write_report(report, Path(cache_dir), manifest_path)
    return report


def _status(result: ThumbnailResult) -> str:
    """'ok', 'failed' (unreadable), or 'no tissue' (read, but nothing to sample: not usable either)."""
    if result.error is not None:
        return "failed"
    return "no tissue" if result.tissue_fraction == 0 else "ok"


def _error(result: ThumbnailResult) -> str | None:
    if result.error is not None:
        return result.error.reason
    if result.tissue_fraction == 0:
        return "no tissue found on the thumbnail (tissue fraction 0): nothing to sample"
    return None


def _write_report(report: PreprocessReport, cache_dir: Path, manifest_path: str | Path) -> list[str]:
    cache_dir.mkdir(parents=True, exist_ok=True)
    parquet_path = cache_dir / f"{REPORT_STEM}.parquet"
    json_path = cache_dir / f"{REPORT_STEM}.json"
    pq.write_table(pa.Table.from_pylist(report.rows), parquet_path)
    summary = {
        "manifest": str(Path(manifest_path).resolve()),
        "cache_dir": report.cache_dir,
        "n_slides": len(report.rows),
        "n_ok": report.n_ok,
        "n_failed": len(report.failed) - report.n_no_tissue,
        "n_no_tissue": report.n_no_tissue,
        "exit_status": report.exit_status,
        # every slide that is not usable: unreadable ("failed") or read but without tissue ("no tissue")
        "failed": [{k: row[k] for k in ("slide_id", "path", "status", "error")} for row in report.failed],
    }
    json_path.write_text(json.dumps(summary, indent=2))
    return [str(parquet_path), str(json_path)]


# -- command line ---------------------------------------------------------------------------------------------


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m jobs.preprocess",
        description="Compute and cache thumbnails and tissue masks for every slide of a manifest (Ray tasks). "
        "Exit status: 0 all slides done, 3 some failed (listed in the report), 1 none done.",
    )
    parser.add_argument("manifest", type=Path, help="manifest.parquet (slide_id, path, label, task, fold, seed)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="cache folder (default: 'cache' beside the manifest); the report is written here")
    parser.add_argument("--preset", default="cpu-small", help="config preset (default: cpu-small)")
    parser.add_argument("--config", type=Path, default=None, help="YAML config file (overrides --preset)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="config override, e.g. slide.thumbnail_downsample=16 (repeatable)")
    parser.add_argument("--task-cpus", type=float, default=_TASK_NUM_CPUS, help="Ray CPUs per slide task")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        config = DualAttentionConfig.from_yaml(args.config) if args.config else preset(args.preset)
        config = config.with_overrides(args.overrides)
    except (ConfigError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    cache_dir = args.cache_dir or args.manifest.resolve().parent / "cache"
    try:
        report = preprocess_manifest(args.manifest, cache_dir, config, task_num_cpus=args.task_cpus,
                                     progress=not args.quiet)
    except ManifestError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_NONE_DONE
    print(report.summary())
    for row in report.failed:
        print(f"{row['status'].upper()} {row['slide_id']} ({row['path']}): {row['error']}", file=sys.stderr)
    print(f"report: {', '.join(report.report_files)}")
    return report.exit_status


if __name__ == "__main__":
    sys.exit(main())
