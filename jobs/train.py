"""Training job: the dual attention model on Ray Train (``python -m jobs.train``, ``dual-attention train``).

What runs where:

- The driver (this process) reads the manifest, preprocesses every slide (thumbnail + tissue mask, cached
  by ``jobs.preprocess``; a broken slide is skipped and reported), puts each slide's thumbnail and mask in
  the object store, and fits one ``TorchTrainer`` per validation fold.
- Each Ray Train worker builds the model, restores the last checkpoint if there is one, wraps the model
  in DDP (``ray.train.torch.prepare_model``; gloo on CPU) and runs the loop: per step a batch of slides
  with every class present (``class_balanced_batches``; the plan is drawn from the epoch's seed, so all
  workers agree on it and take every ``world_size``-th batch), ``pipeline.training_step`` for the loss,
  Adam with one learning rate for the SAM side (SAM + f_f + SAM head) and one for the agent, StepLR per
  epoch. Tiles come from a ``jobs.tile_plane.TilePool`` of reader actors that each worker starts for
  itself (the pool object holds locks and cannot be shipped to workers; its actors die with the worker,
  so a restarted worker gets fresh readers). ``--tile-reader local`` reads with the same ``TileReader``
  code inside the worker process instead, saving the Ray round trip per slide (see
  benchmarks/bench_train_step.py for the measured difference).
- Per epoch, validation slides are scored with ``pipeline.score_slide`` (sharded over workers, gathered
  on rank 0), and rank 0 reports metrics with a checkpoint (``dual_attention.checkpoint`` + optimiser
  state + a few overlay PNGs) via ``ray.train.report``. ``FailureConfig(max_failures)`` restarts a lost
  worker group, which resumes from ``ray.train.get_checkpoint()``.
- MLflow is written by the driver only, after each fold's fit: every epoch's reported metrics (the
  checkpoint history Ray Train keeps, ``Result.best_checkpoints``), the checkpoints and overlays as
  artifacts, and the final model registered as a pyfunc with an alias. Workers never touch MLflow, so the
  default sqlite store in the run folder needs no server and no shared disk beyond Ray's storage path.

Run folder layout (``--run-dir``, default ``runs/<time>-<task>``)::

    config.yaml        the full config of the run (``--resume RUN_DIR`` reads it back)
    state.json         per fold: MLflow run id and the last epoch logged to MLflow
    report.json        slides used and skipped (with reasons), per-fold and combined metrics
    mlflow.db, mlartifacts/   the default MLflow store
    ray/foldK/         Ray Train's storage: checkpoint_epoch_NNN/ folders and its run snapshot

Resuming: ``--resume RUN_DIR`` re-runs the same Ray Train run name and storage path; Ray Train restores
its checkpoint list and the workers continue at the epoch after the last checkpoint (``--epochs`` may
raise the total). ``--resume CHECKPOINT_DIR`` starts a new run folder from that checkpoint's weights,
optimiser state and epoch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from dual_attention.config import DualAttentionConfig, preset

TRAIN_STATE_FILE = "train_state.pt"  # optimiser + scheduler state beside model.pt in a checkpoint
OVERLAY_DIR = "overlays"
METRICS_FILE = "metrics.json"


# -- batches with every class present ----------------------------------------------------------------------


def class_balanced_batches(labels: Sequence[int], num_classes: int, slides_per_batch: int, n_batches: int,
                           rng: np.random.Generator) -> list[list[int]]:
    """``n_batches`` batches of indices into ``labels``, each holding at least one slide of every class.

    Each class has its own shuffled queue, refilled when used up, so every slide of a class is drawn once
    before any is drawn twice. A batch takes one slide per class, then fills its remaining places from a
    queue over all slides (class frequencies as in the data), avoiding repeats inside a batch while it can.
    """
    labels = [int(label) for label in labels]
    if slides_per_batch < num_classes:
        raise ValueError(
            f"train.slides_per_batch ({slides_per_batch}) must be at least the number of classes ({num_classes}) "
            "so that every class is present in a batch"
        )
    by_class = {c: [i for i, label in enumerate(labels) if label == c] for c in range(num_classes)}
    missing = [c for c, members in by_class.items() if not members]
    if missing:
        raise ValueError(f"no training slide of class(es) {missing}: a batch with every class present is impossible")

    def queue(members: list[int]) -> Callable[[], int]:
        pending: list[int] = []

        def take() -> int:
            if not pending:
                pending.extend(int(i) for i in rng.permutation(members))
            return pending.pop()

        return take

    take_class = {c: queue(members) for c, members in by_class.items()}
    take_any = queue(list(range(len(labels))))
    batches: list[list[int]] = []
    for _ in range(n_batches):
        batch = [take_class[c]() for c in range(num_classes)]
        attempts = 0
        while len(batch) < slides_per_batch:
            index = take_any()
            attempts += 1
            if index not in batch or attempts > 4 * len(labels):
                batch.append(index)
        batches.append([batch[i] for i in rng.permutation(len(batch))])
    return batches


def steps_per_epoch(config: DualAttentionConfig, n_train_slides: int, world_size: int) -> int:
    """Steps each worker takes per epoch: ``train.steps_per_epoch``, or one pass over the training slides."""
    if config.train.steps_per_epoch > 0:
        return config.train.steps_per_epoch
    return max(1, math.ceil(n_train_slides / (config.train.slides_per_batch * world_size)))


# -- worker side ---------------------------------------------------------------------------------------------


@dataclass
class _Timer:
    """Seconds waiting for tiles and level-0 pixels read, accumulated by the wrapped ``ReadTiles``."""

    tile_wait_s: float = 0.0
    level0_pixels: int = 0

    def wrap(self, read_tiles: Callable[[Any], np.ndarray]) -> Callable[[Any], np.ndarray]:
        def timed(boxes: Any) -> np.ndarray:
            start = time.perf_counter()
            try:
                return read_tiles(boxes)
            finally:
                self.tile_wait_s += time.perf_counter() - start
                self.level0_pixels += sum(int(b.width) * int(b.height) for b in boxes)

        return timed


def _sam_side_modules(model: Any) -> list[Any]:
    return [model.soft_attention, model.tile_features, model.sam_head]


def build_optimizer(model: Any, config: DualAttentionConfig) -> tuple[Any, Any]:
    """Adam with ``lr_sam`` for SAM + f_f + SAM head and ``lr_agent`` for the agent; StepLR per epoch."""
    import torch

    sam_params = [p for module in _sam_side_modules(model) for p in module.parameters()]
    agent_params = list(model.agent.parameters())
    covered = {id(p) for p in sam_params + agent_params}
    rest = [p for p in model.parameters() if id(p) not in covered]
    groups = [{"params": sam_params, "lr": config.train.lr_sam, "name": "sam"},
              {"params": agent_params + rest, "lr": config.train.lr_agent, "name": "agent"}]
    optimizer = torch.optim.Adam(groups)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.train.lr_step_size,
                                                gamma=config.train.lr_gamma)
    return optimizer, scheduler


def _nanmean_dicts(dicts: Sequence[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for d in dicts for k in d})
    out: dict[str, float] = {}
    for key in keys:
        values = np.array([d[key] for d in dicts if key in d], dtype=np.float64)
        finite = values[np.isfinite(values)]
        out[key] = float(finite.mean()) if finite.size else float("nan")
    return out


def validation_metrics(task: str, num_classes: int, labels: Sequence[int], predicted: Sequence[int],
                       probabilities: Sequence[Sequence[float]], confidence: Sequence[float]) -> dict[str, float]:
    """Slide-level metrics from ``dual_attention.metrics``: accuracy, macro F1, AUROC (when both sides of
    every class are present) and, for HER2, contest agreement points, combined points, weighted confidence."""
    from dual_attention import metrics

    out: dict[str, float] = {"n_slides": float(len(labels))}
    if not labels:
        return out
    truth = np.asarray(labels, dtype=np.int64)
    pred = np.asarray(predicted, dtype=np.int64)
    out["accuracy"] = float((truth == pred).mean())
    out["f1_macro"] = metrics.f1(truth, pred)
    try:
        out["auroc"] = metrics.auroc(truth, np.asarray(probabilities, dtype=np.float64))
    except ValueError:  # a single class among the validation slides: AUROC is undefined
        out["auroc"] = float("nan")
    if task == "her2":
        out["her2_points"] = float(metrics.her2_agreement_points(truth, pred))
        out["her2_points_fraction"] = out["her2_points"] / (15.0 * len(truth))
        out["combined_points"] = metrics.combined_points(truth, pred, confidence)
        out["weighted_confidence"] = metrics.weighted_confidence(truth, pred, confidence)
    return out


def _primary_metric(task: str) -> str:
    return "val_her2_points_fraction" if task == "her2" else "val_auroc"


def _load_train_state(directory: Path, model: Any, optimizer: Any, scheduler: Any) -> int:
    """Load weights (+ optimiser/scheduler when saved) from a checkpoint folder; returns its epoch."""
    import torch

    from dual_attention.checkpoint import load_checkpoint

    loaded, _, extra = load_checkpoint(directory)
    model.load_state_dict(loaded.state_dict())
    state_path = directory / TRAIN_STATE_FILE
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    return int(extra.get("epoch", -1))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker loop (see the module docstring)."""
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from torch import nn

    from dual_attention.checkpoint import save_checkpoint
    from dual_attention.models import DualAttentionModel
    from dual_attention.pipeline import ScoringError, SlideBatch, score_slide, training_phase, training_step
    from dual_attention.slides import SlideError
    from jobs.overlays import save_slide_score_overlay
    from jobs.tile_plane import TilePool, TileReader, TileRequest

    config = DualAttentionConfig.from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    distributed = world > 1 and dist.is_available() and dist.is_initialized()
    seed = config.train.seed
    tile_px = config.tile.tile_level0_px
    torch.manual_seed(seed)  # the same initial weights everywhere (DDP broadcasts rank 0's anyway)
    torch.set_num_threads(max(1, int(loop_config.get("torch_threads", 1))))

    model = DualAttentionModel(config)
    optimizer, scheduler = build_optimizer(model, config)
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restarted worker group, or a resumed run
        with checkpoint.as_directory() as directory:
            start_epoch = _load_train_state(Path(directory), model, optimizer, scheduler) + 1
    elif loop_config.get("resume_checkpoint"):
        start_epoch = _load_train_state(Path(loop_config["resume_checkpoint"]), model, optimizer, scheduler) + 1

    class TrainingStep(nn.Module):
        """Calls ``training_step`` inside ``forward`` so that DDP's gradient hooks see the step."""

        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, batch: SlideBatch, epoch: int, rng: np.random.Generator) -> tuple[Any, dict[str, float]]:
            return training_step(self.inner, batch, epoch, config, rng, augment=True)

    # Separate mode trains half the network per phase; the other half's parameters get no gradient.
    step_module = ray.train.torch.prepare_model(TrainingStep(model),
                                                parallel_strategy_kwargs={"find_unused_parameters": True})
    sam_side = {id(p) for module in _sam_side_modules(model) for p in module.parameters()}

    # Slides: thumbnails and masks from the object store, fetched once per worker.
    slides: list[dict[str, Any]] = loop_config["slides"]
    arrays = ray.get([s["arrays_ref"] for s in slides])
    thumbnails = {s["slide_id"]: a for s, a in zip(slides, arrays, strict=True)}
    train_slides = [s for s in slides if s["fold"] != loop_config["val_fold"]]
    val_slides = [s for s in slides if s["fold"] == loop_config["val_fold"]]
    bad_slides: dict[str, str] = {}

    # "pool": the Ray tile plane (reader actors); "local": the same reader code in this process, no Ray hop.
    local_reader = TileReader() if loop_config.get("tile_reader") == "local" else None
    pool = None if local_reader else TilePool(num_actors=int(loop_config.get("tile_actors_per_worker", 1)))

    def read_tiles_fn(path: str) -> Callable[[Any], np.ndarray]:
        if pool is not None:
            return pool.read_tiles_fn(path, tile_px)

        def read_local(boxes: Any) -> np.ndarray:
            results = local_reader.read_batch([TileRequest(path, box) for box in boxes])
            for result in results:
                if isinstance(result, SlideError):
                    raise result
            return np.stack(results) if results else np.zeros((0, tile_px, tile_px, 3), np.uint8)

        return read_local
    timer = _Timer()

    def slide_inputs(slide: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, tuple[int, int], Callable]:
        thumbnail, tissue = thumbnails[slide["slide_id"]]
        read = timer.wrap(read_tiles_fn(slide["path"]))
        return thumbnail, tissue, tuple(slide["level0_dims"]), read

    n_steps = steps_per_epoch(config, len(train_slides), world)
    fail_marker = loop_config.get("fail_once_marker")
    try:
        for epoch in range(start_epoch, config.train.epochs):
            if fail_marker and epoch == loop_config.get("fail_at_epoch") and rank == world - 1 \
                    and not Path(fail_marker).exists():
                Path(fail_marker).write_text(f"failed once at epoch {epoch}\n")
                raise RuntimeError(f"injected worker failure at epoch {epoch} (test hook)")
            epoch_start = time.perf_counter()
            timer.tile_wait_s, timer.level0_pixels = 0.0, 0
            phase = training_phase(config, epoch)
            plan_rng = np.random.default_rng([seed, epoch])
            live = [s for s in train_slides if s["slide_id"] not in bad_slides]
            plan = class_balanced_batches([s["label"] for s in live], config.num_classes,
                                          config.train.slides_per_batch, n_steps * world, plan_rng)
            step_terms: list[dict[str, float]] = []
            step_module.train()
            for step, indices in enumerate(plan[rank::world]):
                rng = np.random.default_rng([seed, epoch, step, rank])
                members = [live[i] for i in indices]
                while True:  # a slide whose tiles cannot be read leaves the batch (and training) for good
                    members = [s for s in members if s["slide_id"] not in bad_slides]
                    inputs = [slide_inputs(s) for s in members]
                    batch = SlideBatch(
                        thumbnails=[x[0] for x in inputs], tissue_masks=[x[1] for x in inputs],
                        labels=[s["label"] for s in members], level0_dims=[x[2] for x in inputs],
                        read_tiles=[x[3] for x in inputs], slide_ids=[s["slide_id"] for s in members],
                    )
                    try:
                        loss, terms = step_module(batch, epoch, rng)
                        break
                    except SlideError as error:
                        bad_slides[_slide_id_of(members, error.path)] = str(error)
                        if not [s for s in members if s["slide_id"] not in bad_slides]:
                            raise
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if phase != "joint":  # separate mode: the frozen half must not move (Adam would, on zeros)
                    for group in optimizer.param_groups:
                        for p in group["params"]:
                            if (id(p) in sam_side) != (phase == "sam"):
                                p.grad = None
                optimizer.step()
                step_terms.append(terms)
            scheduler.step()
            train_seconds = time.perf_counter() - epoch_start
            train_wait = timer.tile_wait_s

            # Validation, sharded over workers (base model, evaluation mode, fixed seeds per slide).
            model.eval()
            val_rows: list[dict[str, Any]] = []
            overlay_inputs: list[tuple[str, np.ndarray, Any]] = []
            for index in range(rank, len(val_slides), world):
                slide = val_slides[index]
                if slide["slide_id"] in bad_slides:
                    continue
                thumbnail, tissue, dims, read = slide_inputs(slide)
                try:
                    with torch.no_grad():
                        score = score_slide(model, thumbnail, tissue, dims, read, config, seed=seed + index)
                except (SlideError, ScoringError) as error:
                    bad_slides[slide["slide_id"]] = str(error)
                    continue
                val_rows.append({"slide_id": slide["slide_id"], "label": slide["label"],
                                 "predicted": score.predicted_class, "probabilities": score.class_probabilities,
                                 "confidence": score.confidence})
                if rank == 0 and len(overlay_inputs) < int(loop_config.get("overlays_per_epoch", 2)):
                    overlay_inputs.append((slide["slide_id"], thumbnail, score))
            model.train()
            epoch_seconds = time.perf_counter() - epoch_start
            local = {"terms": _nanmean_dicts(step_terms) if step_terms else {}, "val_rows": val_rows,
                     "train_seconds": train_seconds, "train_tile_wait_s": train_wait,
                     "tile_wait_s": timer.tile_wait_s, "level0_pixels": timer.level0_pixels,
                     "epoch_seconds": epoch_seconds, "bad_slides": dict(bad_slides), "steps": len(step_terms)}
            gathered: list[Any] = [None] * world
            if distributed:
                dist.all_gather_object(gathered, local)
            else:
                gathered = [local]
            for other in gathered:  # every worker learns every bad slide
                bad_slides.update(other["bad_slides"])

            all_rows = sorted((r for g in gathered for r in g["val_rows"]), key=lambda r: r["slide_id"])
            val = validation_metrics(config.task, config.num_classes, [r["label"] for r in all_rows],
                                     [r["predicted"] for r in all_rows], [r["probabilities"] for r in all_rows],
                                     [r["confidence"] for r in all_rows])
            terms = _nanmean_dicts([g["terms"] for g in gathered if g["terms"]])
            worker_train_s = [g["train_seconds"] for g in gathered]
            worker_wait_s = [g["train_tile_wait_s"] for g in gathered]
            metrics: dict[str, Any] = {"epoch": epoch, "phase": phase}
            metrics |= {f"train_{k}": v for k, v in terms.items()}
            metrics |= {f"val_{k}": v for k, v in val.items()}
            metrics |= {
                "lr_sam": optimizer.param_groups[0]["lr"], "lr_agent": optimizer.param_groups[1]["lr"],
                "epoch_seconds": max(g["epoch_seconds"] for g in gathered),
                "train_seconds": max(worker_train_s),
                # per worker, averaged: time inside ReadTiles vs the rest of the training steps
                "train_tile_wait_seconds": float(np.mean(worker_wait_s)),
                "train_compute_seconds": float(np.mean([t - w for t, w in zip(worker_train_s, worker_wait_s,
                                                                              strict=True)])),
                "train_tile_wait_fraction": float(np.sum(worker_wait_s) / max(np.sum(worker_train_s), 1e-9)),
                "tile_wait_seconds_total": float(sum(g["tile_wait_s"] for g in gathered)),
                "level0_pixels_read": float(sum(g["level0_pixels"] for g in gathered)),
                "train_steps_per_worker": float(max(g["steps"] for g in gathered)),
                "slides_skipped_in_training": float(len(bad_slides)),
                "bad_slides": json.dumps(bad_slides, sort_keys=True),
            }
            primary = _primary_metric(config.task)
            metrics["val_primary"] = metrics.get(primary, float("nan"))

            if rank == 0:
                # write(), not print(): Ray Train patches print() to log and echo, which shows the line twice
                sys.stdout.write(_epoch_line(metrics, config.train.epochs, primary) + "\n")
                sys.stdout.flush()
                with tempfile.TemporaryDirectory(prefix="dual-attention-ckpt-") as directory:
                    save_checkpoint(directory, model, config, extra={
                        "epoch": epoch, "val_fold": loop_config["val_fold"],
                        "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float | str)},
                    })
                    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                "epoch": epoch}, Path(directory) / TRAIN_STATE_FILE)
                    for slide_id, thumbnail, score in overlay_inputs:
                        save_slide_score_overlay(
                            Path(directory) / OVERLAY_DIR / f"{slide_id}.png", thumbnail, score,
                            config.slide.thumbnail_downsample, class_names=config.class_names,
                            title=f"{slide_id} (label {config.class_names[_label_of(val_slides, slide_id)]}, "
                                  f"predicted {score.predicted_label}, epoch {epoch})")
                    (Path(directory) / METRICS_FILE).write_text(json.dumps(
                        {"metrics": metrics, "val_predictions": all_rows}, indent=1, default=float))
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                                     checkpoint_dir_name=f"checkpoint_epoch_{epoch:03d}")
            else:
                ray.train.report(metrics, checkpoint=None)
    finally:
        if pool is not None:
            pool.shutdown()


def _slide_id_of(slides: Sequence[dict[str, Any]], path: str) -> str:
    for slide in slides:
        if os.path.abspath(slide["path"]) == os.path.abspath(path):
            return slide["slide_id"]
    return str(path)


def _label_of(slides: Sequence[dict[str, Any]], slide_id: str) -> int:
    return next(s["label"] for s in slides if s["slide_id"] == slide_id)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if not math.isfinite(value) else f"{value:.4g}"
    return str(value)


def _epoch_line(metrics: dict[str, Any], epochs: int, primary: str) -> str:
    return (f"[train] epoch {metrics['epoch'] + 1}/{epochs} ({metrics['phase']}) "
            f"l_j={_fmt(metrics.get('train_l_j'))} l_sa={_fmt(metrics.get('train_l_sa'))} "
            f"l_ha={_fmt(metrics.get('train_l_ha'))} val_acc={_fmt(metrics.get('val_accuracy'))} "
            f"{primary}={_fmt(metrics.get(primary))} tile_wait={_fmt(metrics['train_tile_wait_fraction'])} "
            f"{metrics['epoch_seconds']:.1f}s")


# -- driver side ---------------------------------------------------------------------------------------------


@dataclass
class SlideRecord:
    slide_id: str
    path: str
    label: int
    fold: int
    level0_dims: tuple[int, int]


@dataclass
class PreparedCohort:
    slides: list[SlideRecord]
    arrays_refs: dict[str, Any]  # slide_id -> ObjectRef of (thumbnail, tissue_mask)
    skipped: list[dict[str, str]] = field(default_factory=list)  # slide_id, path, reason


def prepare_cohort(manifest_path: str | Path, config: DualAttentionConfig, cache_dir: str | Path) -> PreparedCohort:
    """Read the manifest, compute or load every slide's thumbnail and tissue mask (``jobs.preprocess``),
    skip broken slides with their reason, and put the arrays in the object store."""
    import ray

    from dual_attention.manifest import read_manifest
    from jobs import preprocess

    table = read_manifest(manifest_path)
    rows = table.to_pylist()
    tasks = {row["task"] for row in rows}
    if tasks != {config.task}:
        raise ValueError(f"manifest {manifest_path}: column 'task' holds {sorted(tasks)}, the config's task is "
                         f"'{config.task}'")
    results = preprocess.preprocess_slides(
        [row["path"] for row in rows], config, cache_dir=cache_dir)
    slides: list[SlideRecord] = []
    refs: dict[str, Any] = {}
    skipped: list[dict[str, str]] = []
    for row, result in zip(rows, results, strict=True):
        if result.error is not None:
            skipped.append({"slide_id": row["slide_id"], "path": row["path"], "reason": str(result.error)})
            continue
        slides.append(SlideRecord(slide_id=row["slide_id"], path=row["path"], label=int(row["label"]),
                                  fold=int(row["fold"]), level0_dims=tuple(result.level0_dims)))
        refs[row["slide_id"]] = ray.put((result.thumbnail, result.tissue_mask))
    return PreparedCohort(slides=slides, arrays_refs=refs, skipped=skipped)


def init_ray() -> None:
    """Attach to the cluster a Ray job runs in (``RAY_ADDRESS``) or a local ``ray start`` cluster; else
    start a local one with logical CPUs for 2 workers + tile readers on a small machine."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    from ray._private.services import canonicalize_bootstrap_address

    if canonicalize_bootstrap_address(None) is not None:
        ray.init()
    else:
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False)


def cluster_has_gpu() -> bool:
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) >= 1


@dataclass
class FoldOutcome:
    val_fold: int
    epochs_done: int
    final_metrics: dict[str, Any]
    checkpoint_dir: str | None
    mlflow_run_id: str | None
    val_predictions: list[dict[str, Any]]
    error: str | None = None
    registered: dict[str, str] | None = None


def fit_fold(config: DualAttentionConfig, cohort: PreparedCohort, run_dir: Path, val_fold: int, *,
             use_gpu: bool, max_failures: int, resume_checkpoint: str | None = None,
             overlays_per_epoch: int = 2, tile_actors_per_worker: int = 1, tile_reader: str = "pool",
             fail_at_epoch: int | None = None, callbacks: Sequence[Any] = ()) -> Any:
    """One Ray Train run for one validation fold; returns the ``ray.train.Result``.

    ``callbacks`` go to the trainer's ``RunConfig`` (the tuning job passes Tune's ``TuneReportCallback``
    there, so that every epoch's report reaches Tune)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    val_ids = [s.slide_id for s in cohort.slides if s.fold == val_fold]
    if not val_ids:
        raise ValueError(f"validation fold {val_fold} has no usable slide (manifest column 'fold')")
    slides = [{"slide_id": s.slide_id, "path": s.path, "label": s.label, "fold": s.fold,
               "level0_dims": list(s.level0_dims), "arrays_ref": cohort.arrays_refs[s.slide_id]}
              for s in cohort.slides]
    loop_config: dict[str, Any] = {
        "config": config.to_dict(), "slides": slides, "val_fold": val_fold,
        "resume_checkpoint": resume_checkpoint, "overlays_per_epoch": overlays_per_epoch,
        "tile_actors_per_worker": tile_actors_per_worker, "tile_reader": tile_reader,
    }
    if fail_at_epoch is not None:
        loop_config |= {"fail_at_epoch": fail_at_epoch, "fail_once_marker": str(run_dir / f"failed_once_fold{val_fold}")}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=config.train.num_workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name=f"fold{val_fold}",
            storage_path=str((run_dir / "ray").resolve()),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),  # every epoch's overlays reach MLflow
            callbacks=list(callbacks) or None,
            # Ray Train's own INFO lines (every report, every checkpoint) drown the one line per epoch that
            # rank 0 prints; warnings and errors still show.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    return trainer.fit()


def _epoch_history(result: Any) -> list[tuple[dict[str, Any], Any]]:
    """(metrics, checkpoint) per reported epoch, in epoch order (Ray Train keeps them with checkpoints)."""
    history = [(metrics, checkpoint) for checkpoint, metrics in (result.best_checkpoints or [])]
    return sorted(history, key=lambda item: int(item[0].get("epoch", -1)))


def log_fold_to_mlflow(result: Any, last_logged_epoch: int) -> int:
    """Log epochs after ``last_logged_epoch`` to the active MLflow run; returns the last epoch logged."""
    from jobs import tracking

    for metrics, checkpoint in _epoch_history(result):
        epoch = int(metrics["epoch"])
        if epoch <= last_logged_epoch:
            continue
        tracking.log_metrics(metrics, step=epoch)
        with checkpoint.as_directory() as directory:
            directory = Path(directory)
            pngs = sorted((directory / OVERLAY_DIR).glob("*.png"))
            if pngs:
                tracking.log_pngs(pngs, artifact_path=f"overlays/epoch_{epoch:03d}")
            tracking.log_checkpoint(directory, artifact_path="checkpoints")
        last_logged_epoch = epoch
    return last_logged_epoch


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))


def _local_checkpoint_dir(result: Any) -> str | None:
    if result.checkpoint is None:
        return None
    path = result.checkpoint.path
    return path if Path(path).is_dir() else None


def run_training(config: DualAttentionConfig, manifest: str | Path, run_dir: str | Path, *,
                 val_folds: Sequence[int], mlflow_uri: str | None = None, experiment: str = "dual-attention",
                 model_name: str | None = None, model_alias: str = "candidate", register: bool = True,
                 device: str = "auto", max_failures: int = 2, resume_checkpoint: str | None = None,
                 cache_dir: str | Path | None = None, overlays_per_epoch: int = 2, tile_actors_per_worker: int = 1,
                 tile_reader: str = "pool",
                 fail_at_epoch: int | None = None) -> dict[str, Any]:
    """The whole job: preprocess, one fit per validation fold, MLflow logging and registration, report.

    Returns the report (also written to ``run_dir/report.json``)."""
    import mlflow

    from jobs import tracking

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    config.to_yaml(run_dir / "config.yaml")
    state_path = run_dir / "state.json"
    state = _read_json(state_path)
    init_ray()
    use_gpu = {"auto": cluster_has_gpu(), "gpu": True, "cpu": False}[device]
    config.train.use_gpu = use_gpu

    cache = Path(cache_dir) if cache_dir else run_dir / "cache"
    started = time.perf_counter()
    cohort = prepare_cohort(manifest, config, cache)
    print(f"[train] preprocessed {len(cohort.slides) + len(cohort.skipped)} slides of {manifest} "
          f"({len(cohort.skipped)} skipped) in {time.perf_counter() - started:.1f}s; cache {cache}", flush=True)
    for skipped in cohort.skipped:
        print(f"[train] skipped slide {skipped['slide_id']} ({skipped['path']}): {skipped['reason']}", flush=True)

    tracking.setup_mlflow(run_dir, mlflow_uri, experiment)
    model_name = model_name or tracking.default_model_name(config.task)
    cross_validation = len(val_folds) > 1
    outcomes: list[FoldOutcome] = []
    parent = None  # with cross-validation, one parent MLflow run holds the fold runs and the pooled metrics
    if cross_validation:
        parent = mlflow.start_run(run_id=state["parent_run_id"]) if state.get("parent_run_id") else \
            mlflow.start_run(run_name=f"{run_dir.name}-cv")
    try:
        if parent is not None:
            state["parent_run_id"] = parent.info.run_id
            if not state.get("params_logged"):
                tracking.log_config(config, extra={"val_folds": list(val_folds), "manifest": str(manifest)})
                state["params_logged"] = True
            _log_skipped(cohort.skipped)
        for val_fold in val_folds:
            outcomes.append(_train_fold(
                config, cohort, run_dir, val_fold, state, state_path, nested=cross_validation,
                use_gpu=use_gpu, max_failures=max_failures, resume_checkpoint=resume_checkpoint,
                overlays_per_epoch=overlays_per_epoch, tile_actors_per_worker=tile_actors_per_worker,
                tile_reader=tile_reader,
                fail_at_epoch=fail_at_epoch, manifest=str(manifest), model_name=model_name,
                model_alias=model_alias if not cross_validation else f"{model_alias}-fold{val_fold}",
                register=register))
        combined = _combined_metrics(config, outcomes)
        if parent is not None:
            tracking.log_metrics({f"cv_{k}": v for k, v in combined.items()}, step=0)
            if register:
                _alias_best_fold(config, outcomes, model_name, model_alias)
            mlflow.end_run()
    except BaseException:
        if parent is not None:
            mlflow.end_run(status="FAILED")
        raise
    report = {
        "run_dir": str(run_dir), "manifest": str(manifest), "task": config.task, "config_digest": config.digest(),
        "slides_used": len(cohort.slides), "slides_skipped": cohort.skipped,
        "folds": [_outcome_summary(o) for o in outcomes], "combined": combined,
        "tracking_uri": mlflow.get_tracking_uri(), "model_name": model_name,
    }
    _write_json(run_dir / "report.json", report)
    print(summary_table(config, outcomes, combined), flush=True)
    return report


def _log_skipped(skipped: list[dict[str, str]]) -> None:
    import mlflow

    mlflow.log_metric("slides_skipped", float(len(skipped)))
    mlflow.log_dict({"slides_skipped": skipped}, "slides_skipped.json")


def _train_fold(config: DualAttentionConfig, cohort: PreparedCohort, run_dir: Path, val_fold: int,
                state: dict[str, Any], state_path: Path, *, nested: bool, use_gpu: bool, max_failures: int,
                resume_checkpoint: str | None, overlays_per_epoch: int, tile_actors_per_worker: int, tile_reader: str,
                fail_at_epoch: int | None, manifest: str, model_name: str, model_alias: str,
                register: bool) -> FoldOutcome:
    import mlflow

    from jobs import tracking

    fold_state = state.setdefault("folds", {}).setdefault(str(val_fold), {})
    run_id = fold_state.get("mlflow_run_id")
    run = mlflow.start_run(run_id=run_id, nested=nested) if run_id else \
        mlflow.start_run(run_name=f"{run_dir.name}-fold{val_fold}", nested=nested)
    with run:
        fold_state["mlflow_run_id"] = run.info.run_id
        if not fold_state.get("params_logged"):
            tracking.log_config(config, extra={"val_fold": val_fold, "manifest": manifest,
                                               "resume_checkpoint": resume_checkpoint or ""})
            fold_state["params_logged"] = True
        mlflow.set_tags({"val_fold": str(val_fold), "task": config.task, "run_dir": str(run_dir)})
        _log_skipped(cohort.skipped)
        _write_json(state_path, state)
        started = time.perf_counter()
        result = fit_fold(config, cohort, run_dir, val_fold, use_gpu=use_gpu, max_failures=max_failures,
                          resume_checkpoint=resume_checkpoint, overlays_per_epoch=overlays_per_epoch,
                          tile_actors_per_worker=tile_actors_per_worker, tile_reader=tile_reader,
                          fail_at_epoch=fail_at_epoch)
        print(f"[train] fold {val_fold}: fit in {time.perf_counter() - started:.1f}s", flush=True)
        started = time.perf_counter()
        fold_state["last_logged_epoch"] = log_fold_to_mlflow(result, int(fold_state.get("last_logged_epoch", -1)))
        print(f"[train] fold {val_fold}: logged to MLflow in {time.perf_counter() - started:.1f}s", flush=True)
        _write_json(state_path, state)
        history = _epoch_history(result)
        final_metrics = dict(history[-1][0]) if history else {}
        checkpoint_dir = _local_checkpoint_dir(result)
        predictions: list[dict[str, Any]] = []
        if checkpoint_dir and (Path(checkpoint_dir) / METRICS_FILE).is_file():
            predictions = json.loads((Path(checkpoint_dir) / METRICS_FILE).read_text())["val_predictions"]
        bad = json.loads(final_metrics.get("bad_slides", "{}") or "{}")
        if bad:  # slides that opened but whose tiles failed during training
            mlflow.log_dict({"slides_failed_during_training": bad}, "slides_failed_during_training.json")
        outcome = FoldOutcome(val_fold=val_fold, epochs_done=int(final_metrics.get("epoch", -1)) + 1,
                              final_metrics=final_metrics, checkpoint_dir=checkpoint_dir,
                              mlflow_run_id=run.info.run_id, val_predictions=predictions,
                              error=None if result.error is None else str(result.error))
        if result.error is not None:
            mlflow.set_tag("error", str(result.error)[:5000])
            raise RuntimeError(f"training fold {val_fold} failed: {result.error}") from result.error
        if register and checkpoint_dir:
            registered = tracking.register_model(checkpoint_dir, config.class_names, model_name, model_alias,
                                                 tags={"val_fold": str(val_fold), "run_dir": str(run_dir)})
            outcome.registered = {"name": registered.name, "version": registered.version,
                                  "alias": registered.alias, "model_uri": registered.model_uri}
            mlflow.set_tag("registered_model", f"{registered.name}/{registered.version}@{registered.alias}")
            print(f"[train] registered {registered.model_uri} (version {registered.version})", flush=True)
        return outcome


def _alias_best_fold(config: DualAttentionConfig, outcomes: list[FoldOutcome], name: str, alias: str) -> None:
    """With cross-validation, point ``alias`` at the fold model with the best validation metric."""
    from mlflow import MlflowClient

    primary = _primary_metric(config.task)
    candidates = [o for o in outcomes if o.registered]
    if not candidates:
        return

    def key(outcome: FoldOutcome) -> float:
        value = outcome.final_metrics.get(primary, float("nan"))
        return value if isinstance(value, float) and math.isfinite(value) else -math.inf

    best = max(candidates, key=key)
    MlflowClient().set_registered_model_alias(name, alias, best.registered["version"])
    print(f"[train] alias {alias} -> {name} version {best.registered['version']} (fold {best.val_fold})", flush=True)


def _combined_metrics(config: DualAttentionConfig, outcomes: list[FoldOutcome]) -> dict[str, float]:
    """Metrics over the pooled out-of-fold validation predictions of all folds."""
    rows = [r for o in outcomes for r in o.val_predictions]
    if not rows:
        return {}
    return validation_metrics(config.task, config.num_classes, [r["label"] for r in rows],
                              [r["predicted"] for r in rows], [r["probabilities"] for r in rows],
                              [r["confidence"] for r in rows])


def _outcome_summary(outcome: FoldOutcome) -> dict[str, Any]:
    return {"val_fold": outcome.val_fold, "epochs_done": outcome.epochs_done, "checkpoint": outcome.checkpoint_dir,
            "mlflow_run_id": outcome.mlflow_run_id, "registered": outcome.registered, "error": outcome.error,
            "final_metrics": {k: v for k, v in outcome.final_metrics.items() if k != "bad_slides"}}


def summary_table(config: DualAttentionConfig, outcomes: list[FoldOutcome], combined: dict[str, float]) -> str:
    primary = _primary_metric(config.task)
    columns = ["train_l_j", "val_accuracy", "val_f1_macro", "val_auroc", primary, "train_tile_wait_fraction",
               "epoch_seconds"]
    columns = list(dict.fromkeys(columns))
    header = ["fold", "epochs"] + columns
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for o in outcomes:
        lines.append(" | ".join([str(o.val_fold), str(o.epochs_done)] + [_fmt(o.final_metrics.get(c)) for c in columns]))
    if combined:
        lines.append(" | ".join(["all (pooled)", ""] + [_fmt(combined.get(c.removeprefix("val_")))
                                                         if c.startswith("val_") else "" for c in columns]))
    return "[train] summary\n" + "\n".join(lines)


# -- command line ----------------------------------------------------------------------------------------------


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog or "python -m jobs.train", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", help="cohort manifest.parquet (required unless --resume RUN_DIR)")
    parser.add_argument("--preset", default="cpu-small", help="config preset: paper-her2, paper-mmr, cpu-small")
    parser.add_argument("--task", choices=("her2", "mmr"), help="switch the preset's task")
    parser.add_argument("--config", help="YAML config file (full, or 'preset: NAME' plus changes)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="config override, repeatable (e.g. --set loss.alpha=0.7)")
    parser.add_argument("--epochs", type=int, help="train.epochs")
    parser.add_argument("--num-workers", type=int, help="train.num_workers (Ray Train workers)")
    parser.add_argument("--mode", choices=("joint", "separate"), help="train.mode")
    parser.add_argument("--val-fold", type=int, help="train.val_fold: the manifest fold held out for validation")
    parser.add_argument("--all-folds", action="store_true", help="one run per validation fold (k-fold CV)")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                        help="auto: GPU workers when the cluster has GPUs")
    parser.add_argument("--run-dir", help="run folder (default runs/<time>-<task>)")
    parser.add_argument("--resume", metavar="RUN_DIR_OR_CHECKPOINT",
                        help="continue a stopped run folder, or start from a checkpoint folder (model.pt)")
    parser.add_argument("--cache-dir", help="thumbnail/tissue-mask cache (default <run-dir>/cache)")
    parser.add_argument("--max-failures", type=int, default=2, help="worker-group restarts before giving up")
    parser.add_argument("--mlflow-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite in run dir)")
    parser.add_argument("--experiment", default="dual-attention", help="MLflow experiment name")
    parser.add_argument("--model-name", help="registered model name (default dual-attention-<task>)")
    parser.add_argument("--model-alias", default="candidate", help="alias given to the registered version")
    parser.add_argument("--no-register", action="store_true", help="do not register the final model")
    parser.add_argument("--overlays-per-epoch", type=int, default=2, help="validation overlays logged per epoch")
    parser.add_argument("--tile-actors-per-worker", type=int, default=1, help="tile-reader actors per worker")
    parser.add_argument("--tile-reader", choices=("pool", "local"), default="pool",
                        help="pool: Ray tile-reader actors (default); local: OpenSlide in the worker process")
    parser.add_argument("--inject-failure-at-epoch", type=int, help=argparse.SUPPRESS)  # fault-tolerance tests
    return parser


def _config_from_args(args: argparse.Namespace) -> DualAttentionConfig:
    config = DualAttentionConfig.from_yaml(args.config) if args.config else preset(args.preset, task=args.task)
    overrides = list(args.set)
    for flag, key in (("epochs", "train.epochs"), ("num_workers", "train.num_workers"), ("mode", "train.mode"),
                      ("val_fold", "train.val_fold")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    return config.with_overrides(overrides)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from dual_attention.checkpoint import CheckpointError
    from dual_attention.config import ConfigError
    from dual_attention.manifest import ManifestError

    args = build_parser(prog).parse_args(argv)
    try:
        return _main(args)
    except (ConfigError, ManifestError, CheckpointError) as error:  # bad input: say what, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    resume_checkpoint: str | None = None
    if args.resume:
        resume = Path(args.resume)
        if (resume / "config.yaml").is_file() and (resume / "state.json").is_file():  # a run folder
            run_dir = resume
            config = DualAttentionConfig.from_yaml(resume / "config.yaml")
            overrides = list(args.set) + ([f"train.epochs={args.epochs}"] if args.epochs else [])
            config = config.with_overrides(overrides)
            manifest = args.manifest or _read_json(resume / "state.json").get("manifest")
        elif (resume / "model.pt").is_file() or resume.name == "model.pt":
            from dual_attention.checkpoint import load_checkpoint

            _, config, extra = load_checkpoint(resume)
            config = config.with_overrides(list(args.set) + ([f"train.epochs={args.epochs}"] if args.epochs else []))
            done = int(extra.get("epoch", -1)) + 1
            if done >= config.train.epochs:
                print(f"error: --resume {resume}: the checkpoint has {done} epoch(s) done and train.epochs is "
                      f"{config.train.epochs}; pass --epochs greater than {done}", file=sys.stderr)
                return 2
            resume_checkpoint = str(resume if resume.is_dir() else resume.parent)
            run_dir = Path(args.run_dir) if args.run_dir else None
            manifest = args.manifest
        else:
            print(f"error: --resume {resume}: neither a run folder (config.yaml + state.json) nor a checkpoint "
                  "folder (model.pt)", file=sys.stderr)
            return 2
    else:
        config = _config_from_args(args)
        run_dir = Path(args.run_dir) if args.run_dir else None
        manifest = args.manifest
    if not manifest:
        print("error: --manifest is required", file=sys.stderr)
        return 2
    if run_dir is None:
        run_dir = Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{config.task}"
    run_dir.mkdir(parents=True, exist_ok=True)
    state = _read_json(run_dir / "state.json")
    state["manifest"] = str(Path(manifest).resolve())

    from dual_attention.manifest import read_manifest

    manifest_folds = read_manifest(manifest).column("fold").to_pylist()  # a bad manifest fails here, before Ray
    if args.all_folds:
        val_folds = sorted(set(manifest_folds))
    else:
        val_folds = state.get("val_folds") if args.resume and state.get("val_folds") else [config.train.val_fold]
    state["val_folds"] = val_folds
    _write_json(run_dir / "state.json", state)
    report = run_training(
        config, manifest, run_dir, val_folds=val_folds, mlflow_uri=args.mlflow_uri, experiment=args.experiment,
        model_name=args.model_name, model_alias=args.model_alias, register=not args.no_register,
        device=args.device, max_failures=args.max_failures, resume_checkpoint=resume_checkpoint,
        cache_dir=args.cache_dir, overlays_per_epoch=args.overlays_per_epoch,
        tile_actors_per_worker=args.tile_actors_per_worker, tile_reader=args.tile_reader,
        fail_at_epoch=args.inject_failure_at_epoch,
    )
    print(f"[train] report: {Path(report['run_dir']) / 'report.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
