"""Score a cohort as a Ray Data job: Parquet slide scores and tile records, written as slides finish.

    python -m jobs.score_cohort --model models:/dual-attention-her2@candidate --manifest cohort/manifest.parquet \\
        --out runs/cohort
    dual-attention score-cohort --model runs/quickstart/checkpoint --slides /data/slides --out runs/cohort

Input: a manifest (``slide_id`` and ``path``; ``label``, ``task`` and ``fold`` are used when present, see
``dual_attention.manifest``) or a folder of slide files (``slide_id``: the path under the folder without the
suffix). The stages, each a Ray Data operator:

1. ``ProposeStage`` (actor pool on CPUs, one model copy each): thumbnail, tissue mask, soft attention and the
   sampler (``pipeline.propose_tiles``) -> level-0 boxes;
2. ``read_tiles_stage`` (Ray tasks): the boxes' level-0 pixels, read with OpenSlide;
3. ``AgentStage`` (actor pool of ``--concurrency`` actors, a GPU each when the cluster has them): the
   hard-attention agent over the tiles (``pipeline.score_tiles``) and the slide score (``pipeline.aggregate``).

On a cluster without GPUs the three run fused (``--stages``, default auto): each of ``--propose-actors +
--concurrency`` CPU actors scores whole slides (``SlideStage``), which measured cheaper on CPUs than handing
tiles between processes (``benchmarks/RESULTS.md``, "Cohort job"). The stages are the ones ``pipeline.score_slide`` composes, with the same per-slide seed
(``pipeline.slide_seed``), so a slide scores here exactly as in process. Written into ``--out``, one part per
batch the driver receives (so a stopped job keeps what it finished):

- ``slides/part-RRR-BBBBB.parquet``: one row per slide: ``status`` "ok" (predicted class and label,
  ``prob_<class>``, confidence, fraction of level 0 read, per-stage seconds, model name and version) or
  "error" with ``error`` (the exception's type and message; a bad slide never stops the job);
- ``tiles/part-RRR-BBBBB.parquet``: one row per scored tile: level-0 box, attention weight, class,
  ``prob_<class>`` and the glimpse trail (level-0 x and y lists);
- ``geojson/<slide_id>.geojson``: per scored slide, its tissue outline, attention regions, tiles and glimpse
  boxes as a QuPath-importable FeatureCollection in level-0 px (``dual_attention.annotations``; the outlines
  are drawn in stage 1, where the tissue mask and attention map are; ``--no-geojson`` skips them).

Re-running with the same ``--out`` resumes: slides that already have a row are skipped (``--retry-errors``
scores the failed ones again; ``read_scores`` keeps each slide's latest row). The output of another model,
sampler or seed in ``--out`` is refused rather than mixed in.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dual_attention.annotations import (
    dumps,
    feature_collection,
    region_features,
    slide_properties,
    tile_features,
)
from dual_attention.config import DualAttentionConfig, add_model_flags
from dual_attention.manifest import SCORING_COLUMNS, ManifestError, read_manifest
from dual_attention.pipeline import (
    ScoringError,
    TileProposal,
    aggregate,
    propose_tiles,
    score_tiles,
    slide_seed,
)
from dual_attention.profiling import one_malloc_arena
from dual_attention.slides import Level0Box, open_slide

# Suffixes of the single-file slide formats OpenSlide reads (folder input); other files are ignored.
SLIDE_SUFFIXES: tuple[str, ...] = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".svslide", ".bif")
SLIDES_DIR, TILES_DIR, GEOJSON_DIR = "slides", "tiles", "geojson"
STAGE_PLANS = ("auto", "split", "fused")  # see scored_batches
NO_LABEL = -1  # Ray Data blocks need one type per column: an unlabelled slide carries -1, written as null


# -- input ------------------------------------------------------------------------------------------------------


def slides_in_folder(folder: str | Path) -> list[dict[str, Any]]:
    """Slide files under ``folder`` (recursively, hidden files skipped) as rows; ``slide_id`` is the relative
    path without its suffix, so slides of the same name in different sub-folders stay apart."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"slide folder {folder}: not a folder")
    rows = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if (path.is_file() and path.suffix.lower() in SLIDE_SUFFIXES
                and not any(part.startswith(".") for part in relative.parts)):
            rows.append({"slide_id": relative.with_suffix("").as_posix(), "path": str(path.resolve()),
                         "label": NO_LABEL})
    if not rows:
        raise FileNotFoundError(f"slide folder {folder}: no slide files ({', '.join(SLIDE_SUFFIXES)})")
    seen: dict[str, str] = {}
    for row in rows:  # a.svs and a.tiff side by side would be one slide_id: refuse rather than score one twice
        if row["slide_id"] in seen:
            raise ValueError(f"slide folder {folder}: {seen[row['slide_id']]} and {row['path']} are both slide "
                             f"'{row['slide_id']}'; rename one or list the slides in a manifest")
        seen[row["slide_id"]] = row["path"]
    return rows


def slides_in_manifest(manifest_path: str | Path, task: str) -> list[dict[str, Any]]:
    """The manifest's slides (absolute paths); slides of another task than the model's are refused by name."""
    table = read_manifest(manifest_path, required=SCORING_COLUMNS)
    records = table.to_pylist()
    other = [r["slide_id"] for r in records if r.get("task", task) != task]
    if other:
        raise ManifestError(manifest_path, f"slides of another task than the model's '{task}': {other[:5]}")
    return [{"slide_id": str(r["slide_id"]), "path": str(r["path"]),
             "label": int(r["label"]) if r.get("label") is not None else NO_LABEL} for r in records]


# -- output tables ----------------------------------------------------------------------------------------------


def slide_schema(class_names: Sequence[str]) -> pa.Schema:
    fields = [("slide_id", pa.string()), ("path", pa.string()), ("label", pa.int64()), ("status", pa.string()),
              ("error", pa.string()), ("predicted_class", pa.int64()), ("predicted_label", pa.string())]
    fields += [(f"prob_{name}", pa.float64()) for name in class_names]
    fields += [("confidence", pa.float64()), ("n_tiles", pa.int64()), ("level0_pixels_read", pa.int64()),
               ("fraction_level0_read", pa.float64()), ("width_level0_px", pa.int64()),
               ("height_level0_px", pa.int64()), ("thumbnail_s", pa.float64()), ("propose_s", pa.float64()),
               ("read_s", pa.float64()), ("agent_s", pa.float64()), ("wall_time_s", pa.float64()),
               ("model_name", pa.string()), ("model_version", pa.string()), ("sampler", pa.string()),
               ("seed", pa.int64()), ("slide_seed", pa.int64()), ("run", pa.int64()), ("scored_at", pa.string())]
    return pa.schema(fields)


def tile_schema(class_names: Sequence[str]) -> pa.Schema:
    fields = [("slide_id", pa.string()), ("tile_index", pa.int64()), ("x0", pa.int64()), ("y0", pa.int64()),
              ("width", pa.int64()), ("height", pa.int64()), ("attention_weight", pa.float64()),
              ("predicted_class", pa.int64())]
    fields += [(f"prob_{name}", pa.float64()) for name in class_names]
    fields += [("glimpse_x_level0_px", pa.list_(pa.float64())), ("glimpse_y_level0_px", pa.list_(pa.float64()))]
    return pa.schema(fields)


def _parts(out_dir: Path, kind: str) -> list[Path]:
    return sorted((out_dir / kind).glob("part-*.parquet"))


def read_scores(out_dir: str | Path) -> list[dict[str, Any]]:
    """The slide rows in ``out_dir``, the latest row per slide (parts are named in the order they were
    written, so a slide scored again with ``--retry-errors`` shows its newest result)."""
    latest: dict[str, dict[str, Any]] = {}
    for part in _parts(Path(out_dir), SLIDES_DIR):
        for row in pq.read_table(part).to_pylist():
            latest[row["slide_id"]] = row
    return list(latest.values())


def _write_part(table: pa.Table, path: Path) -> None:
    """Write through a temporary name: a reader (or a resumed run) never sees half a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def geojson_path(out_dir: str | Path, slide_id: str) -> Path:
    """``OUT/geojson/<slide_id>.geojson``; a slide id from a folder keeps its sub-folders, one that would
    leave the folder (absolute, ``..``) is written with its characters %-escaped instead."""
    parts = PurePosixPath(slide_id).parts
    if not parts or PurePosixPath(slide_id).is_absolute() or ".." in parts or "\\" in slide_id:
        return Path(out_dir) / GEOJSON_DIR / f"{quote(slide_id, safe='')}.geojson"
    return Path(out_dir, GEOJSON_DIR, *parts[:-1], f"{parts[-1]}.geojson")


def _write_text(text: str, path: Path) -> None:
    """As ``_write_part``: through a temporary name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _remove_orphan_tile_parts(out_dir: Path) -> None:
    """A part's tiles are written before its slides; tiles without slides are from a job stopped in between,
    whose slides will be scored again, so they go (else their tiles would appear twice)."""
    slide_parts = {p.name for p in _parts(out_dir, SLIDES_DIR)}
    for part in _parts(out_dir, TILES_DIR):
        if part.name not in slide_parts:
            part.unlink()


# -- the stages (run in Ray workers; plain Python objects, so they are testable without Ray) ---------------------


def _error_fields(error: BaseException) -> dict[str, Any]:
    # The exception's own message: a SlideError names the manifest's path, nothing else of the worker's.
    return {"status": "error", "error": f"{type(error).__name__}: {error}", "tiles": b"", "n_tiles": 0}


@dataclass
class StageSettings:
    config: DualAttentionConfig
    sampler: str
    seed: int
    cache_dir: str | None = None
    # GeoJSON annotations per slide (outlines in stage 1, tiles and glimpses in stage 3); the cohort job turns
    # it on, other users of the stages (evaluation) need not pay for it.
    geojson: bool = False


class ProposeStage:
    """Stage 1 (CPU actor): slide row -> thumbnail, tissue mask -> proposed level-0 boxes. A row with a true
    ``overlay`` also carries its thumbnail and attention map on (``overlay_views``), for the driver to draw."""

    def __init__(self, model: Any, settings: StageSettings) -> None:
        one_malloc_arena()  # this actor's SAM tile threads share one heap (bounded peak RSS)
        self.model = model.eval()
        self.settings = settings

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        from jobs.evaluate import load_slide_input  # the one home of thumbnail + tissue mask (+ cache)

        settings, config = self.settings, self.settings.config
        seed = slide_seed(settings.seed, row["slide_id"])
        out = {**row, "slide_seed": seed, "status": "ok", "error": "", "boxes": "[]", "attention": "[]",
               "regions": "[]",
               "width_level0_px": 0, "height_level0_px": 0, "thumbnail_s": float("nan"),
               "propose_s": float("nan"), "read_s": float("nan"), "tiles": b"", "n_tiles": 0}
        if "overlay" in row:  # one type per column: every row of an overlay-flagged input has both
            out |= {"thumbnail": b"", "attention_map": b"", "thumbnail_h": 0, "thumbnail_w": 0}
        try:
            inputs = load_slide_input(row["path"], config.slide.thumbnail_downsample,
                                      config.slide.tissue_min_area_thumb_px, settings.cache_dir)
            started = time.perf_counter()
            proposal = propose_tiles(self.model, inputs.thumbnail, inputs.tissue_mask, inputs.level0_dims, config,
                                     seed, sampler=settings.sampler)
            if not proposal.level0_boxes:
                raise ScoringError(f"no tiles to score: {proposal.shortfall_reason}")
            out |= {"boxes": json.dumps([b.as_tuple() for b in proposal.level0_boxes]),
                    "attention": json.dumps([float(w) for w in proposal.attention_weights]),
                    "width_level0_px": inputs.level0_dims[0], "height_level0_px": inputs.level0_dims[1],
                    "thumbnail_s": inputs.thumbnail_s, "propose_s": time.perf_counter() - started}
            if row.get("overlay"):
                out |= {"thumbnail": inputs.thumbnail.astype(np.uint8).tobytes(),
                        "attention_map": proposal.attention_map.astype(np.float64).tobytes(),
                        "thumbnail_h": inputs.thumbnail.shape[0], "thumbnail_w": inputs.thumbnail.shape[1]}
            if settings.geojson:  # the attention map stays here: only its outlines travel on
                out["regions"] = json.dumps(region_features(
                    inputs.tissue_mask, proposal.attention_map, config.slide.thumbnail_downsample, inputs.level0_dims))
        except Exception as error:  # noqa: BLE001 - a bad slide becomes an error row, never a failed job
            out |= _error_fields(error)
        return out


def overlay_views(row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """(thumbnail (h, w, 3) uint8, attention map (h, w) float64) of a row scored with ``overlay`` set, else
    None."""
    if not row.get("overlay") or not row.get("attention_map"):
        return None
    attention = np.frombuffer(row["attention_map"], dtype=np.float64)
    height, width = row["thumbnail_h"], row["thumbnail_w"]
    return np.frombuffer(row["thumbnail"], dtype=np.uint8).reshape(height, width, 3), attention.reshape(height, width)


def _boxes(row: dict[str, Any]) -> list[Level0Box]:
    return [Level0Box(*box) for box in json.loads(row["boxes"])]


def read_tiles_stage(row: dict[str, Any]) -> dict[str, Any]:
    """Stage 2 (Ray task): the proposed boxes' level-0 pixels, as raw bytes (one Arrow type for every row,
    whatever the number of tiles)."""
    if row["status"] != "ok":
        return row
    try:
        started = time.perf_counter()
        with open_slide(row["path"]) as slide:
            tiles = slide.read_boxes(_boxes(row))
        return {**row, "tiles": tiles.tobytes(), "n_tiles": len(tiles), "read_s": time.perf_counter() - started}
    except Exception as error:  # noqa: BLE001 - as in stage 1
        return {**row, **_error_fields(error)}


class AgentStage:
    """Stage 3 (actor, on a GPU when it has one): tiles -> agent -> slide score; the result row carries its
    tile records as JSON for the driver to write."""

    def __init__(self, model: Any, settings: StageSettings, model_name: str | None, model_version: str | None
                 ) -> None:
        import torch

        self.model = model.eval()
        if torch.cuda.is_available():  # Ray sets CUDA_VISIBLE_DEVICES only for actors granted a GPU
            self.model = self.model.to("cuda")
        self.settings = settings
        self.model_name, self.model_version = model_name, model_version

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        config = self.settings.config
        names = config.class_names
        out = {k: v for k, v in row.items() if k not in ("tiles", "boxes", "attention", "regions")}
        out |= {"predicted_class": -1, "predicted_label": "", "confidence": float("nan"), "level0_pixels_read": 0,
                "fraction_level0_read": float("nan"), "agent_s": float("nan"), "tile_records": "[]",
                "geojson": "", "model_name": self.model_name or "", "model_version": self.model_version or "",
                "sampler": self.settings.sampler, "seed": self.settings.seed}
        out |= {f"prob_{name}": float("nan") for name in names}
        if row["status"] != "ok":
            return out
        try:
            started = time.perf_counter()
            boxes = _boxes(row)
            side = config.tile.tile_level0_px
            tiles = np.frombuffer(row["tiles"], dtype=np.uint8).reshape(len(boxes), side, side, 3)
            proposal = TileProposal(level0_boxes=boxes, attention_weights=np.asarray(json.loads(row["attention"])),
                                    attention_map=np.zeros((0, 0)), centers_thumb_rc=np.zeros((0, 2), dtype=int),
                                    shortfall_reason=None)
            tile_scores = score_tiles(self.model, tiles, proposal, config, row["slide_seed"])
            dims = (row["width_level0_px"], row["height_level0_px"])
            score = aggregate(tile_scores, config.task, dims)
        except Exception as error:  # noqa: BLE001 - as in stage 1
            return out | {k: v for k, v in _error_fields(error).items() if k != "tiles"}
        out |= {"predicted_class": score.predicted_class, "predicted_label": score.predicted_label,
                "confidence": float(score.confidence), "level0_pixels_read": score.level0_pixels_read,
                "fraction_level0_read": score.fraction_level0_read, "agent_s": time.perf_counter() - started}
        out |= {f"prob_{name}": float(p) for name, p in zip(names, score.class_probabilities, strict=True)}
        records = []
        for index, tile in enumerate(score.tiles):
            box = tile.level0_box
            record = {"tile_index": index, "x0": box.x0, "y0": box.y0, "width": box.width, "height": box.height,
                      "attention_weight": tile.attention_weight, "predicted_class": tile.predicted_class,
                      "glimpse_x_level0_px": [float(x) for x, _ in tile.glimpse_trail_level0],
                      "glimpse_y_level0_px": [float(y) for _, y in tile.glimpse_trail_level0]}
            record |= {f"prob_{name}": float(p) for name, p in zip(names, tile.class_probabilities, strict=True)}
            records.append(record)
        out["tile_records"] = json.dumps(records)
        if self.settings.geojson:
            features = json.loads(row["regions"]) + tile_features(score.tiles, names, config.agent.glimpse_px)
            out["geojson"] = dumps(feature_collection(features, slide_properties(
                score, names, slide_id=row["slide_id"],
                model={"name": self.model_name, "version": self.model_version})))
        return out


class SlideStage:
    """The three stages in one CPU actor (``--stages fused``, the default on a cluster without GPUs): a slide's
    tiles never leave the process that read them, and no read-task workers start. Measured on 2 cores
    (``benchmarks/bench_cohort_job.py``): the split pipeline's cost was the start of its actors and read-task
    workers and the tiles' hand-over through the object store, not the scoring."""

    def __init__(self, model: Any, settings: StageSettings, model_name: str | None, model_version: str | None
                 ) -> None:
        self.propose = ProposeStage(model, settings)
        self.agent = AgentStage(model, settings, model_name, model_version)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        return self.agent(read_tiles_stage(self.propose(row)))


def result_tables(rows: Sequence[dict[str, Any]], class_names: Sequence[str], run: int
                  ) -> tuple[pa.Table, pa.Table]:
    """Agent-stage rows -> (slides table, tiles table) with the fixed schemas; sentinels become nulls."""
    scored_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    slides, tiles = [], []
    for row in rows:
        ok = row["status"] == "ok"
        stage_s = [row[k] for k in ("thumbnail_s", "propose_s", "read_s", "agent_s")]
        slide = {field.name: row.get(field.name) for field in slide_schema(class_names)}
        slide |= {"label": None if row["label"] == NO_LABEL else int(row["label"]),
                  "error": row["error"] or None, "run": run, "scored_at": scored_at,
                  "model_name": row["model_name"] or None, "model_version": row["model_version"] or None,
                  "wall_time_s": float(np.nansum(stage_s))}
        if not ok:
            slide |= {"predicted_class": None, "predicted_label": None, "level0_pixels_read": None,
                      "n_tiles": None}
        # NaN marks what was not measured (a stage that never ran, the scores of a failed slide): null in Parquet.
        slide = {k: None if isinstance(v, float) and np.isnan(v) else v for k, v in slide.items()}
        slides.append(slide)
        for record in json.loads(row["tile_records"]):
            tiles.append({"slide_id": row["slide_id"], **record})
    return (pa.Table.from_pylist(slides, schema=slide_schema(class_names)),
            pa.Table.from_pylist(tiles, schema=tile_schema(class_names)))


# -- the job -------------------------------------------------------------------------------------------------------


@dataclass
class CohortReport:
    out_dir: Path
    total: int  # slides in the input
    skipped: int  # already in --out
    scored: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    failures: list[tuple[str, str]] | None = None  # (slide_id, error) of this run

    @property
    def slides_per_hour(self) -> float:
        return 3600.0 * (self.scored + self.failed) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def count(self, slide_rows: Sequence[dict[str, Any]], elapsed_s: float) -> None:
        """Count a batch of finished slides (rows with ``status`` and ``error``) into the totals."""
        for row in slide_rows:
            if row["status"] == "ok":
                self.scored += 1
            else:
                self.failed += 1
                if self.failures is not None:
                    self.failures.append((row["slide_id"], row["error"]))
        self.elapsed_s = elapsed_s

    def progress_line(self) -> str:
        todo = self.total - self.skipped
        return (f"{self.scored + self.failed}/{todo} slides: {self.scored} scored, {self.failed} failed, "
                f"{self.slides_per_hour:.0f} slides/h ({self.skipped} already in {self.out_dir})")


def _check_same_job(existing: list[dict[str, Any]], model_name: str | None, model_version: str | None,
                    sampler: str, seed: int, out_dir: Path) -> None:
    """Resuming only makes sense for the same model, sampler and seed: anything else would mix two jobs."""
    wanted = (model_name, model_version, sampler, seed)
    for row in existing:
        found = (row["model_name"], row["model_version"], row["sampler"], row["seed"])
        if found != wanted:
            raise ValueError(f"{out_dir} holds scores of (model, version, sampler, seed) = {found}, this job is "
                             f"{wanted}: use another --out")


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def _agent_resources(concurrency: int) -> dict[str, float]:
    """A GPU share per agent actor when the cluster has GPUs (at most one each), else one CPU."""
    gpus = _cluster_gpus()
    if gpus >= 1:
        return {"num_gpus": min(1.0, gpus / concurrency)}
    return {"num_cpus": 1}


def score_cohort(model: Any, config: DualAttentionConfig, rows: Sequence[dict[str, Any]], out_dir: str | Path, *,
                 model_name: str | None = None, model_version: str | None = None, sampler: str = "attention",
                 seed: int = 0, concurrency: int = 1, propose_actors: int = 1, retry_errors: bool = False,
                 cache_dir: str | None = None, progress: bool = True, geojson: bool = True, stages: str = "auto",
                 slides_per_block: int | None = None) -> CohortReport:
    """Score ``rows`` (``slide_id``, ``path``, ``label``) not yet in ``out_dir`` through the Ray Data pipeline,
    writing a slides and a tiles part per batch received. Joins the Ray instance already initialised, else
    starts one by the jobs' one rule (``jobs.runtime.cluster``), and only when there is something to score."""
    from jobs.runtime.cluster import RaySession

    if sampler not in ("attention", "random"):
        raise ValueError(f"unknown sampler {sampler!r}; expected 'attention' or 'random'")
    if concurrency < 1 or propose_actors < 1:
        raise ValueError(f"--concurrency and --propose-actors must be >= 1, got {concurrency}, {propose_actors}")
    if slides_per_block is not None and slides_per_block < 1:
        raise ValueError(f"--slides-per-block must be >= 1, got {slides_per_block}")
    if stages not in STAGE_PLANS:
        raise ValueError(f"unknown --stages {stages!r}; expected one of {STAGE_PLANS}")
    out_dir = Path(out_dir)
    _remove_orphan_tile_parts(out_dir)
    existing = read_scores(out_dir)
    _check_same_job(existing, model_name, model_version, sampler, seed, out_dir)
    done = {r["slide_id"] for r in existing if r["status"] == "ok" or not retry_errors}
    todo = [dict(r) for r in rows if r["slide_id"] not in done]
    report = CohortReport(out_dir=out_dir, total=len(rows), skipped=len(rows) - len(todo), failures=[])
    if not todo:
        return report
    with RaySession(log_to_driver=False):
        _run_pipeline(model, config, todo, out_dir, report, model_name=model_name, model_version=model_version,
                      sampler=sampler, seed=seed, concurrency=concurrency, propose_actors=propose_actors,
                      cache_dir=cache_dir, progress=progress, geojson=geojson, stages=stages,
                      slides_per_block=slides_per_block)
    return report


def _run_pipeline(model: Any, config: DualAttentionConfig, todo: list[dict[str, Any]], out_dir: Path,
                  report: CohortReport, *, model_name: str | None, model_version: str | None, sampler: str,
                  seed: int, concurrency: int, propose_actors: int, cache_dir: str | None, progress: bool,
                  geojson: bool, stages: str = "auto", slides_per_block: int | None = None) -> None:
    run = 1 + max((int(p.name.split("-")[1]) for p in _parts(out_dir, SLIDES_DIR)), default=0)
    batches = scored_batches(model, config, todo, model_name=model_name, model_version=model_version,
                             sampler=sampler, seed=seed, concurrency=concurrency, propose_actors=propose_actors,
                             cache_dir=cache_dir, progress_bars=progress, stages=stages,
                             slides_per_block=slides_per_block, geojson=geojson)
    started = time.perf_counter()
    for batch_index, batch in enumerate(batches):
        slides, tiles = result_tables(batch, config.class_names, run)
        name = f"part-{run:03d}-{batch_index:05d}.parquet"
        for row in batch:  # before the slide rows: a slide with a row has its GeoJSON
            if row.get("geojson"):
                _write_text(row["geojson"], geojson_path(out_dir, row["slide_id"]))
        _write_part(tiles, out_dir / TILES_DIR / name)  # tiles first: see _remove_orphan_tile_parts
        _write_part(slides, out_dir / SLIDES_DIR / name)
        report.count(slides.to_pylist(), time.perf_counter() - started)
        print(report.progress_line(), flush=True)


def default_slides_per_block(n_slides: int, actors: int) -> int:
    """Slides per Ray Data block: up to 8 (each block is a task and a part written; on 2048² slides the
    per-block cost was about half a slide's, measured), but at least 4 blocks per actor so that the actors
    share the work evenly and a stopped job loses little."""
    return max(1, min(8, n_slides // (4 * actors)))


def scored_batches(model: Any, config: DualAttentionConfig, todo: Sequence[dict[str, Any]], *,
                   model_name: str | None = None, model_version: str | None = None, sampler: str = "attention",
                   seed: int = 0, concurrency: int = 1, propose_actors: int = 1, read_tasks: int | None = None,
                   cache_dir: str | None = None, progress_bars: bool = False, stages: str = "auto",
                   slides_per_block: int | None = None, geojson: bool = False) -> Iterator[list[dict[str, Any]]]:
    """The scoring pipeline (the one loop that scores slides for the cohort job, evaluation and the
    random-sampling baseline): ``todo`` rows (``slide_id``, ``path``, ``label``; other keys of one type per
    column pass through, e.g. an ``overlay`` flag, see ``ProposeStage``) -> agent-stage rows, a batch at a time
    as slides finish, in no particular order. Needs Ray initialised.

    ``stages``: "split" runs propose actors (``propose_actors``), tile-read tasks (at most ``read_tasks`` at
    once; None: as many as the CPUs allow) and agent actors (``concurrency``, a GPU each where there are GPUs)
    as three operators; "fused" runs all three in each of ``propose_actors + concurrency`` CPU actors
    (``SlideStage``); "auto": split when the cluster has GPUs, else fused. ``slides_per_block`` (None:
    ``default_slides_per_block``) slides travel together through the operators; ``geojson``: each row carries
    its GeoJSON annotations (``StageSettings.geojson``)."""
    import ray

    settings = StageSettings(config=config, sampler=sampler, seed=seed, cache_dir=cache_dir, geojson=geojson)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress_bars
    agent_kwargs = {"model": model, "settings": settings, "model_name": model_name, "model_version": model_version}

    fused = stages == "fused" or (stages == "auto" and _cluster_gpus() < 1)
    actors = propose_actors + concurrency if fused else propose_actors
    per_block = slides_per_block or default_slides_per_block(len(todo), actors)
    ds = ray.data.from_items(list(todo), override_num_blocks=-(-len(todo) // per_block))
    if fused:
        ds = ds.map(SlideStage, fn_constructor_kwargs=agent_kwargs,
                    compute=ray.data.ActorPoolStrategy(size=propose_actors + concurrency), num_cpus=1)
    else:
        ds = ds.map(ProposeStage, fn_constructor_kwargs={"model": model, "settings": settings},
                    compute=ray.data.ActorPoolStrategy(size=propose_actors), num_cpus=1)
        # Half a CPU per read task, as the tile plane's readers (they mostly wait on the file); the resources
        # differing from the agent's also keep Ray Data from fusing the reads into the agent actors, which
        # would hold a GPU (or an actor's model copy) idle while a slide's tiles are read.
        ds = ds.map(read_tiles_stage, num_cpus=0.5, compute=ray.data.TaskPoolStrategy(size=read_tasks))
        ds = ds.map(AgentStage, fn_constructor_kwargs=agent_kwargs,
                    compute=ray.data.ActorPoolStrategy(size=concurrency), **_agent_resources(concurrency))
    yield from _batches(ds)


def _batches(ds: Any) -> Iterator[list[dict[str, Any]]]:
    """The dataset's rows, a block at a time (one slide per block as built), as the blocks finish."""
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield batch.to_pylist()


# -- command line ------------------------------------------------------------------------------------------------


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog or "python -m jobs.score_cohort", description=__doc__.split("\n\n")[0])
    add_model_flags(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="Parquet manifest (slide_id, path; label, task, fold used when present)")
    source.add_argument("--slides", help="folder of slide files (searched recursively)")
    parser.add_argument("--out", required=True, help="output folder (slides/ and tiles/ Parquet parts); resumed")
    parser.add_argument("--sampler", choices=("attention", "random"), default="attention",
                        help="tile sampler: the SAM's (default) or the random Gumbel baseline")
    parser.add_argument("--seed", type=int, default=0, help="base seed; each slide's is slide_seed(seed, slide_id)")
    parser.add_argument("--concurrency", type=int, default=1, help="agent actors (a GPU each when there are GPUs)")
    parser.add_argument("--propose-actors", type=int, default=1,
                        help="CPU actors for thumbnails, tissue masks, soft attention and sampling")
    parser.add_argument("--stages", choices=STAGE_PLANS, default="auto",
                        help="split: propose actors, read tasks, agent actors; fused: all three in each of "
                             "propose-actors + concurrency CPU actors; auto (default): split where there are GPUs")
    parser.add_argument("--slides-per-block", type=int, default=None,
                        help="slides per Ray Data block (default: up to 8, at least 4 blocks per actor)")
    parser.add_argument("--retry-errors", action="store_true", help="score slides that failed before again")
    parser.add_argument("--cache-dir", default=None, help="thumbnail/tissue-mask cache of jobs.preprocess")
    parser.add_argument("--no-geojson", action="store_true",
                        help="skip the per-slide GeoJSON annotations (OUT/geojson/<slide_id>.geojson)")
    parser.add_argument("--quiet", action="store_true", help="no Ray Data progress bars")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    from jobs.runtime.tracking import load_model_for_cli

    loaded = load_model_for_cli(args.model, args.mlflow_uri)
    if loaded is None:
        return 2
    model, config, meta = loaded
    # A checkpoint has no registry name: its resolved path names it (the same however it was spelled).
    model_name = meta["name"] or meta["source"]
    try:
        rows = slides_in_manifest(args.manifest, config.task) if args.manifest else slides_in_folder(args.slides)
        os.makedirs(args.out, exist_ok=True)
        report = score_cohort(model, config, rows, args.out, model_name=model_name, model_version=meta["version"],
                              sampler=args.sampler, seed=args.seed, concurrency=args.concurrency,
                              propose_actors=args.propose_actors, retry_errors=args.retry_errors, stages=args.stages,
                              slides_per_block=args.slides_per_block, cache_dir=args.cache_dir,
                              progress=not args.quiet, geojson=not args.no_geojson)
    except (ManifestError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if report.skipped == report.total:
        print(f"nothing to score: {report.total} slides already in {report.out_dir}")
        return 0
    for slide_id, error in report.failures or []:
        print(f"failed {slide_id}: {error}", file=sys.stderr)
    print(f"done: {report.progress_line()}; in {report.elapsed_s:.1f} s; outputs in {report.out_dir}")
    # Failed slides are reported, not fatal; a run in which every slide failed says so in its exit status.
    return 1 if report.failed and not report.scored else 0


if __name__ == "__main__":
    sys.exit(main())
