"""Training job: the dual attention model on Ray Train (``python -m jobs.train``, ``dual-attention train``).

What runs where:

- The driver (this process) reads the manifest, preprocesses every slide (thumbnail + tissue mask, cached
  by ``jobs.preprocess``; a broken slide is skipped and reported), puts each slide's thumbnail and mask in
  the object store, and fits one ``TorchTrainer`` per validation fold.
- Each Ray Train worker builds the model, restores the last checkpoint if there is one, wraps the model
  in DDP (``ray.train.torch.prepare_model``; gloo on CPU) and runs the core loop
  (``dual_attention.training.EpochLoop``, which runs and is tested without Ray): per step a batch of slides
  with every class present (``class_balanced_batches``; the plan is drawn from the epoch's seed, so all
  workers agree on it and take every ``world_size``-th batch), ``pipeline.training_step`` for the loss,
  Adam with one learning rate for the SAM side (SAM + f_f + SAM head) and one for the agent, StepLR per
  epoch. Tiles are read by the same ``TileReader`` code either in the worker process (``--tile-reader
  local``, the default on CPU workers: no Ray round trip per slide, see benchmarks/bench_train_step.py for
  the measured difference) or by a ``jobs.runtime.tile_plane.TilePool`` of reader actors that each worker
  starts for itself (``pool``, the default beside GPU workers; the pool object holds locks and cannot be
  shipped to workers; its actors die with the worker, so a restarted worker gets fresh readers).
- Per epoch, validation slides are scored with ``pipeline.score_slide`` (sharded over workers; every
  worker's ``EpochShare`` is gathered), and rank 0 reports ``training.epoch_metrics`` with a checkpoint
  (``training.save_training_checkpoint`` + a few overlay PNGs) via ``ray.train.report``. The run's settings
  are one frozen ``TrainRun``; the workers read one ``FoldJob``. ``FailureConfig(max_failures)`` restarts a lost
  worker group, which resumes from ``ray.train.get_checkpoint()``.
- MLflow is written by the driver only, as each epoch ends: a Train controller callback forwards every
  report (rank 0's metrics, the persisted checkpoint) through a Ray queue to a logger thread of the driver
  (``EpochLogger``), which logs the metrics, overlays and checkpoint and records the epoch in state.json.
  After the fit, epochs it missed are caught up from Ray Train's history (``Result.best_checkpoints``) and
  the final model is registered as a pyfunc with an alias. Workers never touch MLflow, so the default
  sqlite store in the run folder needs no server and no shared disk beyond Ray's storage path.
- When workers fail more than ``--max-failures`` times, the fold's MLflow run ends FAILED with the cause
  as tag ``error`` (the full report as artifact error.txt), and the job prints one line naming the cause
  and the ``--resume`` command, and exits with status 1.

Run folder layout (``--run-dir``, default ``runs/<time>-<task>``)::

    config.yaml        the full config of the run (``--resume RUN_DIR`` reads it back)
    state.json         per fold: MLflow run id and the last epoch logged to MLflow
    report.json        slides used and skipped (with reasons), per-fold and combined metrics
    mlflow.db, mlartifacts/   the default MLflow store
    ray/foldK/         Ray Train's storage: checkpoint_epoch_NNN/ folders and its run snapshot

Resuming: ``--resume RUN_DIR`` re-runs the same Ray Train run name and storage path; Ray Train restores
its checkpoint list and the workers continue at the epoch after the last checkpoint (``--epochs`` may
raise the total). The fold's MLflow run goes on too, the same run whatever its status (FAILED after
spent restarts, still RUNNING when the driver was killed), from the epoch after the last one logged. ``--resume CHECKPOINT_DIR`` starts a new run folder from that checkpoint's weights,
optimiser state and epoch.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from dual_attention.config import DualAttentionConfig
from jobs.runtime.cluster import start_ray

OVERLAY_DIR = "overlays"  # validation overlay PNGs in a checkpoint folder, logged to MLflow per epoch
DEVICES = ("auto", "cpu", "gpu")
TILE_READERS = ("auto", "pool", "local")


@dataclass(frozen=True)
class TrainRun:
    """How one training run is carried out, besides the model config: where it writes, where it tracks,
    what its workers run on. Built once (from the command line in ``_main``, or by the quickstart,
    Tune's trials and the benchmarks) and passed whole; the seeds are the config's (``train.seed``)."""

    run_dir: Path
    val_folds: tuple[int, ...] = (0,)
    cache_dir: Path | None = None  # thumbnails and tissue masks; default <run_dir>/cache
    mlflow_uri: str | None = None  # default $MLFLOW_TRACKING_URI, else sqlite in the run folder
    experiment: str = "dual-attention"
    model_name: str | None = None  # default dual-attention-<task>
    model_alias: str = "candidate"
    register: bool = True
    device: str = "auto"  # auto: GPU workers when the cluster has GPUs
    max_failures: int = 2  # worker-group restarts before a fold fails
    resume_checkpoint: str | None = None  # a checkpoint folder to start from (weights, optimiser, epoch)
    overlays_per_epoch: int = 2
    tile_actors_per_worker: int = 1
    tile_reader: str = "auto"  # pool: Ray tile-reader actors; local: OpenSlide in the worker; auto: see below
    torch_threads: int = 1  # torch intra-op threads per Train worker (each holds one logical CPU)
    fail_at_epoch: int | None = None  # test hook: the last worker fails once at this epoch
    fail_always_at_epoch: int | None = None  # test hook: ... at every attempt

    def __post_init__(self) -> None:
        from dual_attention.config import ConfigError

        if self.device not in DEVICES or self.tile_reader not in TILE_READERS:
            raise ConfigError(f"device must be one of {DEVICES} and tile_reader one of {TILE_READERS}, got "
                              f"{self.device!r}, {self.tile_reader!r}")
        for name in ("torch_threads", "tile_actors_per_worker"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_failures < 0 or self.overlays_per_epoch < 0:
            raise ConfigError("--max-failures and --overlays-per-epoch must be >= 0")

    @property
    def cache(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.run_dir) / "cache"

    def use_gpu(self) -> bool:
        """Whether Train workers take a GPU (``auto`` asks the cluster; Ray must be running)."""
        return cluster_has_gpu() if self.device == "auto" else self.device == "gpu"

    def reads_tiles_in_worker(self, use_gpu: bool) -> bool:
        """``auto``: CPU workers read their own tiles (a worker already holds the CPU the read needs, and the
        actor round trip made tile waits 20-24% of a step against 2-7% in the worker: benchmarks/RESULTS.md,
        Training); GPU workers leave reads to reader actors on the node's other CPUs."""
        return self.tile_reader == "local" or (self.tile_reader == "auto" and not use_gpu)

    def tile_actors(self, use_gpu: bool) -> int:
        """Tile-reader actors each Train worker starts (none when it reads in its own process)."""
        return 0 if self.reads_tiles_in_worker(use_gpu) else self.tile_actors_per_worker


@dataclass(frozen=True)
class FoldJob:
    """Everything a Ray Train worker of one fold reads (the trainer's ``train_loop_config["job"]``)."""

    config: DualAttentionConfig
    cohort: PreparedCohort
    run: TrainRun
    val_fold: int

    @property
    def fail_once_marker(self) -> Path:
        return Path(self.run.run_dir) / f"failed_once_fold{self.val_fold}"


# -- worker side: the core loop (dual_attention.training.EpochLoop) under Ray Train ------------------------------


def _quiet_ray_train_reports() -> None:
    """Ray Train 2.60 logs every ``report`` call with its whole metrics dict at INFO from the worker
    (~80 lines of dumps per run, whatever ``LoggingConfig`` says); rank 0's epoch line says it all. Its
    logger is named after the module's file, so it is silenced by that name."""
    import logging

    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker: Ray Train's context, the model wrapped in DDP, the core ``EpochLoop`` over
    this rank's share, the shares gathered, and one report per epoch (rank 0's with the checkpoint)."""
    import ray.train
    import ray.train.torch
    import torch

    from dual_attention import training
    from dual_attention.models import DualAttentionModel

    _quiet_ray_train_reports()
    job: FoldJob = loop_config["job"]
    config, run, val_fold = job.config, job.run, job.val_fold
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # Where Ray placed each worker (the workers SPREAD over the nodes; the cluster recipe test reads this).
    print(f"[train] worker {rank + 1}/{world} on node {ray.get_runtime_context().get_node_id()}", flush=True)
    torch.manual_seed(config.train.seed)  # the same initial weights everywhere (DDP broadcasts rank 0's anyway)
    torch.set_num_threads(run.torch_threads)

    model = DualAttentionModel(config)
    optimizer, scheduler = training.build_optimizer(model, config)
    start_epoch = _restore(model, optimizer, scheduler, run.resume_checkpoint)
    # Separate mode trains half the network per phase; the other half's parameters get no gradient.
    step_module = ray.train.torch.prepare_model(training.TrainingStep(model, config),
                                                parallel_strategy_kwargs={"find_unused_parameters": True})
    slides = job.cohort.slides
    readers = _WorkerTileReaders(run, config.tile.tile_level0_px)
    examples = _worker_examples(job.cohort, readers)
    loop = training.EpochLoop(model, config, optimizer, scheduler,
                              [e for s, e in zip(slides, examples, strict=True) if s.fold != val_fold],
                              [e for s, e in zip(slides, examples, strict=True) if s.fold == val_fold],
                              step_module=step_module, rank=rank, world=world)
    try:
        for epoch in range(start_epoch, config.train.epochs):
            _inject_failure(job, epoch, rank, world)
            share, validated = loop.run_epoch(epoch)
            shares = _gather(share, world)
            for other in shares:  # every worker learns every bad slide
                loop.bad_slides.update(other.bad_slides)
            metrics = training.epoch_metrics(config, epoch, shares, optimizer)
            if rank == 0:
                _print_epoch(metrics, config)
                _report_with_checkpoint(model, config, optimizer, scheduler, val_fold, metrics, shares,
                                        validated[:run.overlays_per_epoch])
            else:
                ray.train.report(metrics, checkpoint=None)
    finally:
        readers.shutdown()


def _restore(model: Any, optimizer: Any, scheduler: Any, resume_checkpoint: str | None) -> int:
    """The epoch to start at: after Ray Train's latest checkpoint (a restarted worker group, a resumed run
    folder), else after ``--resume CHECKPOINT``'s, else 0."""
    import ray.train

    from dual_attention.training import load_train_state

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            return load_train_state(directory, model, optimizer, scheduler) + 1
    if resume_checkpoint:
        return load_train_state(resume_checkpoint, model, optimizer, scheduler) + 1
    return 0


def _inject_failure(job: FoldJob, epoch: int, rank: int, world: int) -> None:
    """Test hooks of the fault-tolerance tests: the last rank fails once (a marker file remembers it), or
    at every attempt, at the given epoch."""
    if epoch == job.run.fail_at_epoch and rank == world - 1 and not job.fail_once_marker.exists():
        job.fail_once_marker.write_text(f"failed once at epoch {epoch}\n")
        raise RuntimeError(f"injected worker failure at epoch {epoch} (test hook)")
    if epoch == job.run.fail_always_at_epoch and rank == world - 1:
        raise RuntimeError(f"injected persistent worker failure at epoch {epoch} (test hook)")


def _gather(share: Any, world: int) -> list[Any]:
    """Every worker's ``EpochShare``, on every worker."""
    import torch.distributed as dist

    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [share]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, share)
    return gathered


def _print_epoch(metrics: dict[str, Any], config: DualAttentionConfig) -> None:
    from dual_attention.training import epoch_line, primary_validation_key

    # write(), not print(): Ray Train patches print() to log and echo, which shows the line twice
    sys.stdout.write(epoch_line(metrics, config.train.epochs, primary_validation_key(config.task)) + "\n")
    if metrics.get("attention_warning"):
        sys.stdout.write(f"[train] WARNING at epoch {metrics['epoch'] + 1}: {metrics['attention_warning']}; "
                         "check loss.sam_signal, train.sam_warmup_steps and the learning rates\n")
    sys.stdout.flush()


class _WorkerTileReaders:
    """Tile readers of one worker: ``pool``, the Ray tile plane (reader actors this worker starts; the
    pool holds locks and cannot be shipped, and its actors die with the worker), or ``local``, the same
    ``TileReader`` code in this process."""

    def __init__(self, run: TrainRun, tile_px: int) -> None:
        from jobs.runtime.tile_plane import TilePool, TileReader

        self.tile_px = tile_px
        self.local = TileReader() if run.tile_reader == "local" else None  # fit_fold resolved "auto"
        self.pool = None if self.local else TilePool(num_actors=run.tile_actors_per_worker)

    def read_tiles_fn(self, path: str) -> Callable[[Any], np.ndarray]:
        from dual_attention.slides import SlideError
        from jobs.runtime.tile_plane import TileRequest

        if self.pool is not None:
            return self.pool.read_tiles_fn(path, self.tile_px)

        def read_local(boxes: Any) -> np.ndarray:
            results = self.local.read_batch([TileRequest(path, box) for box in boxes])
            for result in results:
                if isinstance(result, SlideError):
                    raise result
            return np.stack(results) if results else np.zeros((0, self.tile_px, self.tile_px, 3), np.uint8)

        return read_local

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def _worker_examples(cohort: PreparedCohort, readers: _WorkerTileReaders) -> list[Any]:
    """Each slide's thumbnail, tissue mask and tumour mask (from the object store, fetched once per worker)
    with its tile reader."""
    import ray

    from dual_attention.training import SlideExample

    arrays = ray.get([cohort.arrays_refs[s.slide_id] for s in cohort.slides])
    return [SlideExample(slide_id=s.slide_id, label=s.label, thumbnail=thumbnail, tissue_mask=tissue,
                         level0_dims=s.level0_dims, read_tiles=readers.read_tiles_fn(s.path), tumour_mask=tumour,
                         path=s.path)
            for s, (thumbnail, tissue, tumour) in zip(cohort.slides, arrays, strict=True)]


def _report_with_checkpoint(model: Any, config: DualAttentionConfig, optimizer: Any, scheduler: Any,
                            val_fold: int, metrics: dict[str, Any], shares: Sequence[Any],
                            overlays: Sequence[Any]) -> None:
    """Rank 0: the epoch's checkpoint (``training.save_training_checkpoint``) plus validation overlays of a
    fixed set of slides, reported with the epoch's metrics."""
    import ray.train

    from dual_attention.overlays import save_slide_score_overlay
    from dual_attention.training import save_training_checkpoint

    epoch = int(metrics["epoch"])
    rows = sorted((r for share in shares for r in share.val_rows), key=lambda r: r["slide_id"])
    with tempfile.TemporaryDirectory(prefix="dual-attention-ckpt-") as directory:
        save_training_checkpoint(directory, model, config, optimizer, scheduler, epoch, metrics, rows,
                                 extra={"val_fold": val_fold})
        for validated in overlays:
            example, score = validated.example, validated.score
            save_slide_score_overlay(
                Path(directory) / OVERLAY_DIR / f"{example.slide_id}.png", example.thumbnail, score,
                config.slide.thumbnail_downsample, class_names=config.class_names,
                title=f"{example.slide_id} (label {config.class_names[example.label]}, "
                      f"predicted {score.predicted_label}, epoch {epoch + 1})")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=f"checkpoint_epoch_{epoch:03d}")


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
    arrays_refs: dict[str, Any]  # slide_id -> ObjectRef of (thumbnail, tissue_mask, tumour_mask or None)
    skipped: list[dict[str, str]] = field(default_factory=list)  # slide_id, path, reason


def prepare_cohort(manifest_path: str | Path, config: DualAttentionConfig, cache_dir: str | Path) -> PreparedCohort:
    """Read the manifest, compute or load every slide's thumbnail and tissue mask (``jobs.preprocess``),
    skip broken slides with their reason, and put the arrays in the object store."""
    import ray

    from dual_attention.manifest import read_manifest
    from dual_attention.slides import SlideError, read_tumour_mask
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
        tumour = None
        if row.get("tumour_mask_path"):  # diagnostics only (attention on tumour); never a training signal
            try:
                tumour = read_tumour_mask(row["tumour_mask_path"], result.tissue_mask.shape)
            except SlideError as error:
                print(f"[train] slide {row['slide_id']}: {error}; no attention-on-tumour figure for it", flush=True)
        slides.append(SlideRecord(slide_id=row["slide_id"], path=row["path"], label=int(row["label"]),
                                  fold=int(row["fold"]), level0_dims=tuple(result.level0_dims)))
        refs[row["slide_id"]] = ray.put((result.thumbnail, result.tissue_mask, tumour))
    return PreparedCohort(slides=slides, arrays_refs=refs, skipped=skipped)


def cluster_has_gpu() -> bool:
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) >= 1


class TrainingFailed(RuntimeError):
    """A fold whose training failed for good (worker-group restarts spent); its MLflow run is FAILED with
    the cause as tag ``error``, and the run folder can be resumed."""

    def __init__(self, val_fold: int, cause: str, mlflow_run_id: str, run_dir: Path, max_failures: int,
                 last_logged_epoch: int) -> None:
        logged = ("before any epoch was logged" if last_logged_epoch < 0 else "with epoch 0 logged"
                  if last_logged_epoch == 0 else f"with epochs 0-{last_logged_epoch} logged")
        super().__init__(f"training fold {val_fold} failed after {max_failures} worker-group restart(s) "
                         f"(--max-failures {max_failures}): {cause}; MLflow run {mlflow_run_id} ended FAILED {logged}")
        self.val_fold, self.cause, self.mlflow_run_id, self.run_dir = val_fold, cause, mlflow_run_id, run_dir


def failure_cause(error: BaseException) -> str:
    """One line naming why a fit failed: the first failed worker's exception (its traceback's last line),
    else the controller's, else the error's own last line."""
    def last_line(exc: BaseException) -> str:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        return lines[-1] if lines else type(exc).__name__

    worker_failures = getattr(error, "worker_failures", None)
    if worker_failures:
        rank, exc = min(worker_failures.items())
        more = f" (and {len(worker_failures) - 1} more worker(s))" if len(worker_failures) > 1 else ""
        return f"worker {rank}: {last_line(exc)}{more}"
    controller_failure = getattr(error, "controller_failure", None)
    if controller_failure is not None:
        return f"Train controller: {last_line(controller_failure)}"
    return f"{type(error).__name__}: {last_line(error)}"


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


def fit_fold(config: DualAttentionConfig, cohort: PreparedCohort, run: TrainRun, val_fold: int,
             callbacks: Sequence[Any] = ()) -> Any:
    """One Ray Train run for one validation fold, under ``run.run_dir/ray/fold<k>``; returns the
    ``ray.train.Result``.

    ``callbacks`` go to the trainer's ``RunConfig`` (the tuning job passes Tune's ``TuneReportCallback``
    there, so that every epoch's report reaches Tune)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not any(s.fold == val_fold for s in cohort.slides):
        raise ValueError(f"validation fold {val_fold} has no usable slide (manifest column 'fold')")
    use_gpu = run.use_gpu()
    run = dataclasses.replace(run, tile_reader="local" if run.reads_tiles_in_worker(use_gpu) else "pool")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": FoldJob(config, cohort, run, val_fold)},
        # SPREAD: on a cluster the workers go to different nodes where they fit (each reads its own tiles,
        # so the nodes' disks and cores add up); on one node it places them as PACK would.
        scaling_config=ScalingConfig(num_workers=config.train.num_workers, use_gpu=use_gpu,
                                     placement_strategy="SPREAD"),
        run_config=RunConfig(
            name=f"fold{val_fold}",
            storage_path=str((Path(run.run_dir) / "ray").resolve()),
            failure_config=FailureConfig(max_failures=run.max_failures),
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


def log_epoch_to_mlflow(client: Any, run_id: str, metrics: dict[str, Any], checkpoint: Any) -> int:
    """One reported epoch into MLflow run ``run_id``: its numeric metrics (step = epoch), its overlays and
    its checkpoint folder. Through a client with an explicit run id, not the fluent API: the fluent active
    run is per thread, and the per-epoch logger runs in a thread of its own. Returns the epoch."""
    from mlflow.entities import Metric

    from jobs.runtime import tracking

    epoch = int(metrics["epoch"])
    now_ms = int(time.time() * 1000)
    values = [Metric(k, v, now_ms, epoch) for k, v in tracking.numeric_metrics(metrics).items()]
    if values:
        client.log_batch(run_id, metrics=values)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            directory = Path(directory)
            for png in sorted((directory / OVERLAY_DIR).glob("*.png")):
                client.log_artifact(run_id, str(png), artifact_path=f"overlays/epoch_{epoch:03d}")
            # named after the folder in Ray's storage (checkpoint_epoch_NNN), not the local copy's name
            client.log_artifacts(run_id, str(directory),
                                 artifact_path=f"checkpoints/{Path(checkpoint.path).name}")
    return epoch


def log_fold_to_mlflow(result: Any, last_logged_epoch: int, client: Any = None, run_id: str | None = None) -> int:
    """Log epochs after ``last_logged_epoch`` to ``run_id`` (default: the active MLflow run); returns the
    last epoch logged. After a fit this catches up on what the per-epoch logger did not log (a resumed run
    whose earlier driver was killed between an epoch's report and its logging)."""
    import mlflow

    if client is None or run_id is None:
        client, run_id = mlflow.MlflowClient(), mlflow.active_run().info.run_id
    for metrics, checkpoint in _epoch_history(result):
        if int(metrics["epoch"]) <= last_logged_epoch:
            continue
        last_logged_epoch = log_epoch_to_mlflow(client, run_id, metrics, checkpoint)
    return last_logged_epoch


def _forward_reports_callback(queue: Any) -> Any:
    """A Ray Train ``UserCallback`` (it runs in the Train controller) that puts rank 0's metrics and the
    persisted checkpoint of every report on ``queue``, for the driver to log while the fit goes on.
    Built in a function so that importing this module does not import Ray Train."""
    from ray.train import UserCallback

    class ForwardReports(UserCallback):
        def __init__(self, queue: Any) -> None:
            self._queue = queue

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if metrics and "epoch" in metrics[0]:
                self._queue.put((dict(metrics[0]), checkpoint))

    return ForwardReports(queue)


class EpochLogger:
    """Logs each epoch to MLflow as soon as Ray Train reports it, from a thread of the driver.

    ``trainer.fit()`` blocks the driver until the run ends, and only then hands back the epoch history;
    a run that fails, or a driver that is killed, would leave MLflow without any epoch. So a controller
    callback (``callback``) forwards every report through a Ray queue, and this thread logs it to the
    fold's run and calls ``on_logged(epoch)`` (the job records the epoch in state.json, so a resumed run
    does not log it again). The queue actor asks for no CPU: the trainer's workers hold the cluster's."""

    def __init__(self, tracking_uri: str, run_id: str, last_logged_epoch: int,
                 on_logged: Callable[[int], None]) -> None:
        from mlflow import MlflowClient
        from ray.util.queue import Queue

        self.run_id = run_id
        self.last_logged_epoch = last_logged_epoch
        self.errors: list[str] = []  # epochs that could not be logged, with the reason
        self._client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self._on_logged = on_logged
        self._queue = Queue(actor_options={"num_cpus": 0})
        self.callback = _forward_reports_callback(self._queue)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlflow-epoch-logger", daemon=True)

    def __enter__(self) -> EpochLogger:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Log what is still queued, then stop (fit has returned: no report is in flight any more)."""
        import ray

        self._stopping.set()
        self._thread.join(timeout=300)
        with contextlib.suppress(Exception):  # already gone with its job: nothing to release
            ray.kill(self._queue.actor)

    def _run(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                metrics, checkpoint = self._queue.get(timeout=0.5)
            except Empty:
                if self._stopping.is_set():
                    return
                continue
            except Exception as error:  # the queue actor died (Ray shut down): nothing more will come
                self.errors.append(f"report queue lost: {type(error).__name__}: {error}")
                return
            epoch = int(metrics["epoch"])
            if epoch <= self.last_logged_epoch:
                continue  # logged by an earlier driver of this run
            if self.errors:  # an earlier epoch failed to log: leave this one to the catch-up, in order
                self.errors.append(f"epoch {epoch}: not logged after the failure above")
                continue
            try:
                log_epoch_to_mlflow(self._client, self.run_id, metrics, checkpoint)
            except Exception as error:  # the catch-up after a finished fit logs it again from Ray's history
                self.errors.append(f"epoch {epoch}: {type(error).__name__}: {error}")
                continue
            self.last_logged_epoch = epoch
            self._on_logged(epoch)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    # Written aside, then renamed: a driver killed mid-write must not leave a truncated state.json behind,
    # since --resume reads the MLflow run id and the last logged epoch from it.
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
    os.replace(partial, path)


def _local_checkpoint_dir(result: Any) -> str | None:
    if result.checkpoint is None:
        return None
    path = result.checkpoint.path
    return path if Path(path).is_dir() else None


def run_training(config: DualAttentionConfig, manifest: str | Path, run: TrainRun) -> dict[str, Any]:
    """The whole job: train ``config`` on ``manifest`` as ``run`` says: preprocess, one fit per validation
    fold, MLflow logging and registration, report. Neither ``config`` nor ``run`` is changed.

    Returns the report (also written to ``run.run_dir/report.json``)."""
    import mlflow

    from jobs.runtime import tracking

    run = dataclasses.replace(run, run_dir=Path(run.run_dir).resolve(),
                              model_name=run.model_name or tracking.default_model_name(config.task))
    run_dir, val_folds, model_name, model_alias = run.run_dir, run.val_folds, run.model_name, run.model_alias
    run_dir.mkdir(parents=True, exist_ok=True)
    config.to_yaml(run_dir / "config.yaml")
    state_path = run_dir / "state.json"
    state = _read_json(state_path)
    start_ray()

    cache = run.cache
    started = time.perf_counter()
    cohort = prepare_cohort(manifest, config, cache)
    print(f"[train] preprocessed {len(cohort.slides) + len(cohort.skipped)} slides of {manifest} "
          f"({len(cohort.skipped)} skipped) in {time.perf_counter() - started:.1f}s; cache {cache}", flush=True)
    for skipped in cohort.skipped:
        print(f"[train] skipped slide {skipped['slide_id']} ({skipped['path']}): {skipped['reason']}", flush=True)

    tracking.setup_mlflow(run_dir, run.mlflow_uri, run.experiment)
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
            outcomes.append(_train_fold(config, cohort, run, str(manifest), val_fold, state, state_path))
        combined = _combined_metrics(config, outcomes)
        if parent is not None:
            tracking.log_metrics({f"cv_{k}": v for k, v in combined.items()}, step=0)
            if run.register:
                _alias_best_fold(config, outcomes, model_name, model_alias)
            mlflow.end_run()
    except BaseException as error:
        if parent is not None:
            if isinstance(error, TrainingFailed):
                mlflow.set_tag("error", f"fold {error.val_fold}: {error.cause}"[:5000])
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


def _train_fold(config: DualAttentionConfig, cohort: PreparedCohort, run: TrainRun, manifest: str, val_fold: int,
                state: dict[str, Any], state_path: Path) -> FoldOutcome:
    """One fold: its MLflow run (nested under the cross-validation parent; continued on resume), the fit
    with each epoch logged as it ends, the outcome, and the fold's model registered."""
    import mlflow

    from dual_attention.training import val_predictions_of
    from jobs.runtime import tracking

    fold_state = state.setdefault("folds", {}).setdefault(str(val_fold), {})
    run_id = fold_state.get("mlflow_run_id")
    if run_id:
        # The same MLflow run goes on, whatever its status: RUNNING when the earlier driver was killed
        # (nothing ended it), FAILED when its workers failed too often. Epochs it logged stay logged.
        status = mlflow.MlflowClient().get_run(run_id).info.status
        print(f"[train] fold {val_fold}: continuing MLflow run {run_id} (was {status}; epochs up to "
              f"{int(fold_state.get('last_logged_epoch', -1))} already logged)", flush=True)
    nested = len(run.val_folds) > 1
    model_alias = f"{run.model_alias}-fold{val_fold}" if nested else run.model_alias
    mlflow_run = mlflow.start_run(run_id=run_id, nested=nested) if run_id else \
        mlflow.start_run(run_name=f"{run.run_dir.name}-fold{val_fold}", nested=nested)
    with mlflow_run:
        fold_state["mlflow_run_id"] = mlflow_run.info.run_id
        if not fold_state.get("params_logged"):
            tracking.log_config(config, extra={"val_fold": val_fold, "manifest": manifest,
                                               "resume_checkpoint": run.resume_checkpoint or ""})
            fold_state["params_logged"] = True
        mlflow.set_tags({"val_fold": str(val_fold), "task": config.task, "run_dir": str(run.run_dir)})
        _log_skipped(cohort.skipped)
        _write_json(state_path, state)

        def logged(epoch: int) -> None:  # from the logger's thread; the driver's own thread waits in fit()
            fold_state["last_logged_epoch"] = epoch
            _write_json(state_path, state)

        started = time.perf_counter()
        failure: Exception | None = None
        with EpochLogger(mlflow.get_tracking_uri(), mlflow_run.info.run_id, int(fold_state.get("last_logged_epoch", -1)),
                         logged) as epoch_logger:
            try:
                result = fit_fold(config, cohort, run, val_fold, callbacks=[epoch_logger.callback])
            except Exception as error:  # ray.train.TrainingFailedError once --max-failures restarts are spent
                failure = error
        if epoch_logger.errors:
            print(f"[train] fold {val_fold}: per-epoch MLflow logging: {'; '.join(epoch_logger.errors)}",
                  file=sys.stderr, flush=True)
        if failure is not None:
            from ray.train import TrainingFailedError

            cause = failure_cause(failure)
            mlflow.set_tag("error", cause[:5000])  # the run ends FAILED as the exception leaves `with run`
            mlflow.log_text(f"{type(failure).__name__}: {failure}\n", "error.txt")  # the whole report, once
            if not isinstance(failure, TrainingFailedError):
                raise failure  # not a training failure (e.g. a refused input): its own message says what
            raise TrainingFailed(val_fold, cause, mlflow_run.info.run_id, run.run_dir, run.max_failures,
                                 int(fold_state.get("last_logged_epoch", -1))) from failure
        print(f"[train] fold {val_fold}: fit in {time.perf_counter() - started:.1f}s", flush=True)
        started = time.perf_counter()
        fold_state["last_logged_epoch"] = log_fold_to_mlflow(result, int(fold_state.get("last_logged_epoch", -1)))
        print(f"[train] fold {val_fold}: epochs logged to MLflow as they ended; catch-up and wrap-up in "
              f"{time.perf_counter() - started:.1f}s", flush=True)
        _write_json(state_path, state)
        history = _epoch_history(result)
        final_metrics = dict(history[-1][0]) if history else {}
        checkpoint_dir = _local_checkpoint_dir(result)
        predictions = val_predictions_of(checkpoint_dir) if checkpoint_dir else []
        bad = json.loads(final_metrics.get("bad_slides", "{}") or "{}")
        if bad:  # slides that opened but whose tiles failed during training
            mlflow.log_dict({"slides_failed_during_training": bad}, "slides_failed_during_training.json")
        outcome = FoldOutcome(val_fold=val_fold, epochs_done=int(final_metrics.get("epoch", -1)) + 1,
                              final_metrics=final_metrics, checkpoint_dir=checkpoint_dir,
                              mlflow_run_id=mlflow_run.info.run_id, val_predictions=predictions,
                              error=None if result.error is None else str(result.error))
        if result.error is not None:
            mlflow.set_tag("error", str(result.error)[:5000])
            raise RuntimeError(f"training fold {val_fold} failed: {result.error}") from result.error
        if run.register and checkpoint_dir:
            registered = tracking.register_model(checkpoint_dir, config.class_names, run.model_name, model_alias,
                                                 tags={"val_fold": str(val_fold), "run_dir": str(run.run_dir)})
            outcome.registered = {"name": registered.name, "version": registered.version,
                                  "alias": registered.alias, "model_uri": registered.model_uri}
            mlflow.set_tag("registered_model", f"{registered.name}/{registered.version}@{registered.alias}")
            print(f"[train] registered {registered.model_uri} (version {registered.version})", flush=True)
        return outcome


def _alias_best_fold(config: DualAttentionConfig, outcomes: list[FoldOutcome], name: str, alias: str) -> None:
    """With cross-validation, point ``alias`` at the fold model with the best validation metric."""
    from mlflow import MlflowClient

    from dual_attention.training import primary_validation_key

    primary = primary_validation_key(config.task)
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
    from dual_attention.training import validation_metrics

    return validation_metrics(config.task, rows)


def _outcome_summary(outcome: FoldOutcome) -> dict[str, Any]:
    return {"val_fold": outcome.val_fold, "epochs_done": outcome.epochs_done, "checkpoint": outcome.checkpoint_dir,
            "mlflow_run_id": outcome.mlflow_run_id, "registered": outcome.registered, "error": outcome.error,
            "final_metrics": {k: v for k, v in outcome.final_metrics.items() if k != "bad_slides"}}


def summary_table(config: DualAttentionConfig, outcomes: list[FoldOutcome], combined: dict[str, float]) -> str:
    from dual_attention.training import format_figure as _fmt
    from dual_attention.training import primary_validation_key

    primary = primary_validation_key(config.task)
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


def add_run_flags(parser: argparse.ArgumentParser, *, experiment: str, model_alias: str, max_failures: int) -> None:
    """The run flags the training and tuning jobs share (each with its own defaults where they differ)."""
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto: GPU workers when the cluster has GPUs")
    parser.add_argument("--cache-dir", help="thumbnail/tissue-mask cache (default <run folder>/cache)")
    parser.add_argument("--max-failures", type=int, default=max_failures,
                        help="worker-group restarts before a training run gives up")
    parser.add_argument("--tile-actors-per-worker", type=int, default=1,
                        help="tile-reader actors per Train worker (reads through the pool only: GPU workers, "
                             "--tile-reader pool)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads per Train worker (each holds one logical CPU)")
    parser.add_argument("--mlflow-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite in the "
                                             "run folder)")
    parser.add_argument("--experiment", default=experiment, help="MLflow experiment name")
    parser.add_argument("--model-name", help="registered model name (default dual-attention-<task>)")
    parser.add_argument("--model-alias", default=model_alias, help="alias given to the registered version")
    parser.add_argument("--no-register", action="store_true", help="do not register the model")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    from dual_attention.config import add_config_flags

    parser = argparse.ArgumentParser(prog=prog or "python -m jobs.train", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", help="cohort manifest.parquet (required unless --resume RUN_DIR)")
    add_config_flags(parser)
    parser.add_argument("--all-folds", action="store_true", help="one run per validation fold (k-fold CV)")
    parser.add_argument("--run-dir", help="run folder (default runs/<time>-<task>)")
    parser.add_argument("--resume", metavar="RUN_DIR_OR_CHECKPOINT",
                        help="continue a stopped run folder, or start from a checkpoint folder (model.pt)")
    add_run_flags(parser, experiment="dual-attention", model_alias="candidate", max_failures=2)
    parser.add_argument("--overlays-per-epoch", type=int, default=2, help="validation overlays logged per epoch")
    parser.add_argument("--tile-reader", choices=TILE_READERS, default="auto",
                        help="pool: Ray tile-reader actors; local: OpenSlide in the worker process; auto (default): "
                             "local on CPU workers, pool beside GPU workers")
    parser.add_argument("--inject-failure-at-epoch", type=int, help=argparse.SUPPRESS)  # fault-tolerance tests
    # a worker that fails at this epoch on every attempt (failure-reporting tests)
    parser.add_argument("--inject-persistent-failure-at-epoch", type=int, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from dual_attention.checkpoint import CheckpointError
    from dual_attention.config import ConfigError
    from dual_attention.manifest import ManifestError

    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        return _main(args)
    except (ConfigError, ManifestError, CheckpointError) as error:  # bad input: say what, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingFailed as error:  # the cause and the way on, in one line; the details are in MLflow
        print(f"error: {error}; continue with: {parser.prog} --resume {error.run_dir}", file=sys.stderr)
        return 1


def _main(args: argparse.Namespace) -> int:
    from dual_attention.config import config_from_flags, flag_overrides

    resume_checkpoint: str | None = None
    if args.resume:
        resume = Path(args.resume)
        overrides = flag_overrides(args, shortcuts=("--epochs",))  # the rest is the run's own
        if (resume / "config.yaml").is_file() and (resume / "state.json").is_file():  # a run folder
            run_dir = resume
            config = DualAttentionConfig.from_yaml(resume / "config.yaml").with_overrides(overrides)
            manifest = args.manifest or _read_json(resume / "state.json").get("manifest")
        elif (resume / "model.pt").is_file() or resume.name == "model.pt":
            from dual_attention.checkpoint import load_checkpoint

            _, config, extra = load_checkpoint(resume)
            config = config.with_overrides(overrides)
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
        config = config_from_flags(args)
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
    run = TrainRun(
        run_dir=run_dir, val_folds=tuple(val_folds), cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        mlflow_uri=args.mlflow_uri, experiment=args.experiment, model_name=args.model_name,
        model_alias=args.model_alias, register=not args.no_register, device=args.device,
        max_failures=args.max_failures, resume_checkpoint=resume_checkpoint,
        overlays_per_epoch=args.overlays_per_epoch, tile_actors_per_worker=args.tile_actors_per_worker,
        tile_reader=args.tile_reader, torch_threads=args.torch_threads, fail_at_epoch=args.inject_failure_at_epoch,
        fail_always_at_epoch=args.inject_persistent_failure_at_epoch)
    report = run_training(config, manifest, run)
    print(f"[train] report: {Path(report['run_dir']) / 'report.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
