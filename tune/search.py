"""Hyperparameter search over the training job (``python -m tune.search``, ``dual-attention tune``).

What it searches: the fields declared in a search-space YAML (``tune/default_space.yaml``: alpha, delta
and the noise range; optionally learning rates, beta, N tiles, T glimpses), centred on the base config
(``--preset``/``--config``/``--set``, the paper's values for the paper presets). The space is validated
before anything starts; a refused range names its field and the command exits with status 2.

How it runs (Ray 2.60, Train V2):

- ``ray.tune.Tuner`` over a function trainable (``tune.trial.train_trial``) that fits the training job's
  ``TorchTrainer`` for the trial's config; Tune's ``TuneReportCallback`` in the trainer's ``RunConfig``
  forwards every epoch's ``ray.train.report`` to Tune.
- ASHA (``AsyncHyperBandScheduler``) stops trials that trail at a rung, on the validation metric:
  the task's primary validation metric (``dual_attention.metrics.primary_metric``: HER2 contest agreement
  points per case, of 15, or macro F1 for MMR), unless ``--metric`` says otherwise; time axis ``epochs_done``.
- Random search (seeded) or Optuna's TPE (``--searcher optuna``); the first trial is the centre.
- ``max_concurrent_trials`` = the trials that fit the cluster's CPUs (and GPUs): each trial needs its
  Train workers, their tile-reader actors and its own small actor (``ray.cluster_resources()``).
- The thumbnails and tissue masks are prepared once, in the driver, and shared by all trials.

What it writes, under ``<storage-path>/<name>/`` (the experiment folder, also Tune's):

    search.json              the settings (``--resume`` reads them back) and the MLflow parent run id
    space.yaml               the search space used
    trial_runs/<trial id>/   each trial's Ray Train storage (checkpoint per epoch)
    results/trials.parquet, results/trials.csv, results/metric_vs_params.png, results/report.json
    mlflow.db, mlartifacts/  the default MLflow store (``--mlflow-uri`` points elsewhere)

MLflow: a parent run for the search and a child run per trial (tag ``mlflow.parentRunId``), every epoch's
metrics in the child; the best trial's best-epoch checkpoint is registered (default alias ``best-search``).

Resuming: ``--resume EXPERIMENT_DIR`` continues a stopped search (``Tuner.restore``): finished trials are
kept, unfinished ones are restarted and continue from their last Train checkpoint, the searcher goes on
from its saved state. Trial checkpoints load with ``weights_only`` (``dual_attention.training.load_train_state``), but
``Tuner.restore`` itself unpickles Ray's experiment state (trainable, searcher, callbacks): resume only an
experiment folder this project wrote, on storage others cannot write to. ``--storage-path`` and ``--mlflow-uri`` may point at shared storage (a path every
node sees, a tracking server), so the same command runs on a multi-node cluster (``RAY_ADDRESS``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from dual_attention.config import ConfigError, DualAttentionConfig, config_from_flags
from tune.space import DEFAULT_SPACE_PATH, NOISE_WIDTH, SearchSpace, SearchSpaceError, space_from_dict

SETTINGS_FILE = "search.json"
SPACE_FILE = "space.yaml"
RESULTS_DIR = "results"
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # Ray Train's worker poll period (--train-poll-s)


@dataclass
class SearchSettings:
    """Everything a search needs; stored in the experiment folder so that ``--resume`` needs nothing else."""

    manifest: str
    base_config: dict[str, Any]
    space: dict[str, Any]  # the space's YAML mapping
    space_source: str
    storage_path: str
    name: str
    num_samples: int = 8
    searcher: str = "random"  # random | optuna
    metric: str | None = None  # default: primary_validation_key(task)
    mode: str = "max"
    grace_period: int = 1
    reduction_factor: int = 2
    max_concurrent: int | None = None  # default: what fits the cluster
    seed: int = 0
    device: str = "auto"
    tile_actors_per_worker: int = 1
    torch_threads: int = 1
    max_failures: int = 0
    train_poll_interval_s: float | None = None
    cache_dir: str | None = None  # thumbnails and tissue masks (default <experiment>/cache)
    mlflow_uri: str | None = None
    experiment: str = "dual-attention-tune"
    model_name: str | None = None
    model_alias: str = "best-search"
    register: bool = True
    parent_run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def experiment_dir(self) -> Path:
        return Path(self.storage_path).resolve() / self.name

    def base(self) -> DualAttentionConfig:
        return DualAttentionConfig.from_dict(self.base_config)

    def search_space(self) -> SearchSpace:
        return space_from_dict(self.space, self.base(), source=f"search space {self.space_source}")

    def trial_run(self, use_gpu: bool | None = None) -> Any:
        """The ``jobs.train.TrainRun`` every trial fits with (its run folder holds one folder per trial);
        ``use_gpu`` fixes the device the search resolved once. Refuses bad values by the training job's rules."""
        from jobs.train import TrainRun

        device = self.device if use_gpu is None else ("gpu" if use_gpu else "cpu")
        return TrainRun(self.experiment_dir / "trial_runs", device=device, max_failures=self.max_failures,
                        overlays_per_epoch=0, tile_actors_per_worker=self.tile_actors_per_worker,
                        torch_threads=self.torch_threads)

    def metric_name(self) -> str:
        from dual_attention.training import primary_validation_key  # torch: not at import (fast --help)

        return self.metric or primary_validation_key(self.base_config["task"])

    def save(self) -> None:
        self.experiment_dir.mkdir(parents=True, exist_ok=True)
        (self.experiment_dir / SETTINGS_FILE).write_text(json.dumps(asdict(self), indent=1, sort_keys=True))
        (self.experiment_dir / SPACE_FILE).write_text(yaml.safe_dump(self.space, sort_keys=False))

    @classmethod
    def load(cls, experiment_dir: str | Path) -> SearchSettings:
        path = Path(experiment_dir) / SETTINGS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"--resume {experiment_dir}: no {SETTINGS_FILE} there (not a search folder)")
        return cls(**json.loads(path.read_text()))


@dataclass
class SearchOutcome:
    experiment_dir: Path
    rows: list[Any]
    best: Any | None
    centre: Any | None
    table_paths: tuple[Path, Path]
    plot_path: Path
    registered: Any | None
    parent_run_id: str
    tracking_uri: str
    wall_seconds: float
    max_concurrent: int
    report: dict[str, Any]


def check_space_for_search(space: SearchSpace) -> None:
    """Refuse what one preprocessing pass cannot serve: thumbnails and masks are made once per search."""
    for name in space.names:
        if name.startswith("slide."):
            raise SearchSpaceError(f"{space.source}: {name} changes the preprocessing (thumbnails, tissue masks), "
                                   "which a search does once for all trials; it cannot be searched")


def _ledger_name(experiment_dir: Path) -> str:
    return "dual-attention-tune-ledger-" + hashlib.sha1(str(experiment_dir).encode()).hexdigest()[:12]


def run_search(settings: SearchSettings, resume: bool = False, restart_errored: bool = False) -> SearchOutcome:
    """Run (or resume) a search; returns what it found. Ray is started here unless already running."""
    # mlflow.set_tracking_uri also sets $MLFLOW_TRACKING_URI for the whole process: put it back afterwards,
    # so that a later job in this process does not take this search's store for the user's choice.
    from jobs.runtime.cluster import restored_environ

    with restored_environ(("MLFLOW_TRACKING_URI", TRAIN_POLL_ENV)):
        if settings.train_poll_interval_s is not None:
            # Set here, in the driver's own thread before Tune starts a trial: Tune hands Ray Train's variables
            # on to every trial actor's runtime environment, and Ray Train on to the controller it starts. The
            # trial function used to set it itself, writing the process environment from Tune's runner thread
            # while the actor's other threads run (setenv is not safe against concurrent readers).
            os.environ[TRAIN_POLL_ENV] = str(settings.train_poll_interval_s)
        return _run_search(settings, resume, restart_errored)


def _run_search(settings: SearchSettings, resume: bool, restart_errored: bool) -> SearchOutcome:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from jobs.runtime import tracking
    from jobs.runtime.cluster import start_ray
    from jobs.train import prepare_cohort
    from tune import results as results_mod
    from tune.cleanup import ReleaseStoppedTrials, start_ledger
    from tune.mlflow_runs import (
        TrialRunsInMlflow,
        child_run_id,
        finish_parent_run,
        register_best,
        start_parent_run,
    )
    from tune.trial import (
        EPOCHS_DONE,
        TRIAL_DRIVER_CPUS,
        TrialJob,
        max_concurrent_trials,
        train_trial,
        trial_resources,
    )

    started = time.perf_counter()
    space = settings.search_space()  # validated: nothing below starts before the space is accepted
    check_space_for_search(space)
    base = space.base
    experiment_dir = settings.experiment_dir
    metric, mode = settings.metric_name(), settings.mode
    epochs = base.train.epochs

    start_ray()
    use_gpu = settings.trial_run().use_gpu()  # asked once: every trial gets the same answer
    actors_per_worker = settings.trial_run(use_gpu).tile_actors(use_gpu)  # none where workers read their tiles
    per_trial = trial_resources(base.train.num_workers, actors_per_worker, use_gpu)
    concurrent = settings.max_concurrent or max_concurrent_trials(ray.cluster_resources(), per_trial)
    gpus = f", {per_trial['GPU']:g} GPU" if use_gpu else ""
    print(f"[tune] {settings.num_samples} trials, at most {concurrent} at once (each needs {per_trial['CPU']:g} "
          f"CPU{gpus}); metric {metric} ({mode}); experiment {experiment_dir}", flush=True)

    if settings.mlflow_uri is None:  # fixed at the first start: a resumed search logs to the same store
        settings.mlflow_uri = tracking.resolve_tracking_uri(experiment_dir, None)
    tracking_uri = settings.mlflow_uri
    experiment_id = tracking.setup_mlflow(experiment_dir, tracking_uri, settings.experiment)
    if settings.parent_run_id is None:
        settings.parent_run_id = start_parent_run(
            tracking_uri, experiment_id, run_name=settings.name,
            params={"base": base.to_dict(), "search": {
                "space": json.dumps(settings.space), "num_samples": settings.num_samples,
                "searcher": settings.searcher, "metric": metric, "mode": mode, "seed": settings.seed,
                "grace_period": settings.grace_period, "reduction_factor": settings.reduction_factor,
                "manifest": settings.manifest, "max_concurrent": concurrent}},
            tags={"experiment_dir": str(experiment_dir), "task": base.task})
    settings.save()

    cohort = prepare_cohort(settings.manifest, base, Path(settings.cache_dir or experiment_dir / "cache"))
    for skipped in cohort.skipped:
        print(f"[tune] skipped slide {skipped['slide_id']} ({skipped['path']}): {skipped['reason']}", flush=True)
    ledger_name = _ledger_name(experiment_dir)
    ledger = start_ledger(ledger_name)
    job = TrialJob(space=space, cohort=cohort, run=settings.trial_run(use_gpu), ledger_name=ledger_name)
    # The trial's actor reserves only its own share: its Train workers and tile readers ask for theirs when
    # the trial starts them. Reserving the whole per_trial demand here held those CPUs twice, so the workers
    # of the trials running at once could not be placed (per_trial only sizes the concurrency above).
    trainable = tune.with_resources(tune.with_parameters(train_trial, job=job), {"CPU": TRIAL_DRIVER_CPUS})

    if resume:
        if not tune.Tuner.can_restore(str(experiment_dir)):
            raise FileNotFoundError(f"--resume {experiment_dir}: no Tune experiment state there to resume")
        tuner = tune.Tuner.restore(str(experiment_dir), trainable=trainable, resume_unfinished=True,
                                   restart_errored=restart_errored)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space.to_tune(),
            tune_config=tune.TuneConfig(
                metric=metric, mode=mode, num_samples=settings.num_samples,
                # Optuna gets Tune's ConcurrencyLimiter; the random searcher limits itself (see _searcher)
                max_concurrent_trials=concurrent if settings.searcher == "optuna" else None,
                search_alg=_searcher(settings, space, concurrent),
                # max_t one past the last epoch: a trial that runs every epoch ends by itself (its Train
                # run shuts down cleanly) instead of being stopped at its last report; the rungs are the same.
                scheduler=ASHAScheduler(time_attr=EPOCHS_DONE, max_t=epochs + 1, grace_period=settings.grace_period,
                                        reduction_factor=settings.reduction_factor),
            ),
            run_config=tune.RunConfig(
                name=settings.name, storage_path=str(experiment_dir.parent),
                callbacks=[TrialRunsInMlflow(tracking_uri, experiment_id, settings.parent_run_id, epochs),
                           ReleaseStoppedTrials(ledger_name)],
                failure_config=tune.FailureConfig(max_failures=0),
                verbose=1,
            ),
        )
    try:
        grid = tuner.fit()
        removed = ray.get(ledger.removed_groups.remote())
    finally:
        ray.kill(ledger)

    rows = results_mod.trial_rows(grid, space, metric, mode, epochs)
    best = results_mod.best_row(rows, mode)
    centre = next((r for r in rows if r.is_centre), None)
    runs = {r.trial_id: child_run_id(tracking_uri, experiment_id, settings.parent_run_id, r.trial_id) for r in rows}
    out_dir = experiment_dir / RESULTS_DIR
    table_paths = results_mod.write_table(results_mod.rows_table(rows, metric, runs), out_dir)
    plot_path = results_mod.plot_trials(rows, metric, out_dir / "metric_vs_params.png",
                                        title=f"{settings.name}: {len(rows)} trials, {base.task}")
    registered = settings.extra.get("registered")  # a resumed search that had already finished
    if registered and best is not None and registered.get("trial_id") == best.trial_id:
        registered = tracking.RegisteredModel(**{k: v for k, v in registered.items() if k != "trial_id"})
    elif settings.register and best is not None and best.best_checkpoint and runs.get(best.trial_id):
        registered = register_best(
            tracking_uri, runs[best.trial_id], best.best_checkpoint, base.class_names,
            settings.model_name or tracking.default_model_name(base.task), settings.model_alias,
            tags={"search": settings.name, "trial_id": best.trial_id, "metric": metric,
                  "value": f"{best.metric_best:.6g}"})
        settings.extra["registered"] = dict(asdict(registered), trial_id=best.trial_id)
        settings.save()
    else:
        registered = None
    wall = time.perf_counter() - started
    report = {
        "experiment_dir": str(experiment_dir), "metric": metric, "mode": mode, "trials": len(rows),
        "stopped_early": sum(r.stopped_early for r in rows), "errored": sum(r.status == "ERROR" for r in rows),
        "placement_groups_released": len(removed), "max_concurrent": concurrent, "wall_seconds": wall,
        "best": None if best is None else _row_summary(best), "centre": None if centre is None else _row_summary(centre),
        "registered": None if registered is None else asdict(registered),
        "mlflow": {"tracking_uri": tracking_uri, "experiment": settings.experiment,
                   "parent_run_id": settings.parent_run_id},
    }
    report_path = out_dir / "report.json"
    report_path.write_text(json.dumps(report, indent=1, default=str))
    best_metrics = {} if best is None else {f"best_{metric}": best.metric_best}
    if centre is not None:
        best_metrics[f"centre_{metric}"] = centre.metric_best
    finish_parent_run(
        tracking_uri, settings.parent_run_id, dict(best_metrics, trials=len(rows), wall_seconds=wall),
        tags={"best_trial_id": best.trial_id if best else "", "best_child_run_id": runs.get(best.trial_id, "")
              if best else "", "registered_model": registered.model_uri if registered else ""},
        artifacts=[*table_paths, plot_path, report_path, experiment_dir / SPACE_FILE])
    print("\n".join(["[tune] trials:", *results_mod.summary_lines(rows, metric)]), flush=True)
    if best is not None:
        print(f"[tune] best: trial {best.trial_id} {metric}={best.metric_best:.4g} (epoch {best.best_epoch}) with "
              + ", ".join(f"{k}={v:.4g}" for k, v in best.values.items() if k != NOISE_WIDTH), flush=True)
    if registered is not None:
        print(f"[tune] registered {registered.model_uri} (version {registered.version})", flush=True)
    print(f"[tune] table {table_paths[0]}, plot {plot_path}; {wall:.1f}s", flush=True)
    return SearchOutcome(experiment_dir=experiment_dir, rows=rows, best=best, centre=centre, table_paths=table_paths,
                         plot_path=plot_path, registered=registered, parent_run_id=settings.parent_run_id,
                         tracking_uri=tracking_uri, wall_seconds=wall, max_concurrent=concurrent, report=report)


def _row_summary(row: Any) -> dict[str, Any]:
    return {"trial_id": row.trial_id, "values": row.values, "metric_best": row.metric_best,
            "best_epoch": row.best_epoch, "epochs_done": row.epochs_done, "stopped_early": row.stopped_early,
            "checkpoint": row.best_checkpoint}


def _searcher(settings: SearchSettings, space: SearchSpace, max_concurrent: int) -> Any:
    """Random search or Optuna (TPE), both seeded, both starting from the centre when it lies inside.

    Tune applies ``max_concurrent_trials`` to a ``Searcher`` (Optuna) but ignores it for the random
    ``BasicVariantGenerator``, which takes its own ``max_concurrent``."""
    from tune.ray_registry import guard_ray_tune_registry

    guard_ray_tune_registry()  # the searcher and the Tuner register trainables: see tune.ray_registry
    points = [space.centre()] if space.centre_inside() else []
    if not points:
        print("[tune] note: the base config's values lie outside the space; no centre trial", flush=True)
    if settings.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(points_to_evaluate=points or None, seed=settings.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(points_to_evaluate=points or None, random_state=settings.seed,
                                 max_concurrent=max_concurrent)


# -- command line ----------------------------------------------------------------------------------------------


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    from dual_attention.config import add_config_flags
    from jobs.train import add_run_flags

    parser = argparse.ArgumentParser(prog=prog or "python -m tune.search", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", help="cohort manifest.parquet (required unless --resume)")
    # the base config (--epochs: every trial's, ASHA's max_t); --mode here is the metric's direction
    add_config_flags(parser, shortcuts=("--epochs", "--num-workers", "--val-fold"))
    parser.add_argument("--space", help=f"search space YAML (default {DEFAULT_SPACE_PATH.name})")
    parser.add_argument("--num-samples", type=int, default=8, help="trials")
    parser.add_argument("--searcher", choices=("random", "optuna"), default="random")
    parser.add_argument("--metric", help="validation metric to optimise (default: the task's primary one, "
                                         "val_ + dual_attention.metrics.PRIMARY_METRIC, as training ranks folds)")
    parser.add_argument("--mode", choices=("max", "min"), default="max")
    parser.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial can be stopped")
    parser.add_argument("--reduction-factor", type=int, default=2, help="ASHA: 1/rf of trials go on at a rung")
    parser.add_argument("--max-concurrent", type=int, help="trials at once (default: what the cluster fits)")
    parser.add_argument("--storage-path", default="runs/tune", help="where experiment folders go (shared on a "
                                                                    "multi-node cluster)")
    parser.add_argument("--name", help="experiment folder name (default <time>-<task>)")
    parser.add_argument("--resume", metavar="EXPERIMENT_DIR", help="continue a stopped search")
    parser.add_argument("--restart-errored", action="store_true", help="with --resume: rerun errored trials too")
    parser.add_argument("--seed", type=int, default=0, help="searcher seed")
    parser.add_argument("--train-poll-s", type=float, help="seconds between Ray Train's polls of its workers "
                                                           "(Ray's default 2; lower for short test epochs)")
    # the run folder is the experiment folder; the model registered is the best trial's
    add_run_flags(parser, experiment="dual-attention-tune", model_alias="best-search", max_failures=0)
    return parser


def settings_from_args(args: argparse.Namespace) -> SearchSettings:
    """Build (and validate) the settings of a new search; a refused config or space raises ConfigError."""
    if not args.manifest:
        raise ConfigError("--manifest is required for a new search")
    if not Path(args.manifest).is_file():
        raise ConfigError(f"--manifest {args.manifest}: no such file")
    base = config_from_flags(args)
    space_path = Path(args.space) if args.space else DEFAULT_SPACE_PATH
    try:
        space_data = yaml.safe_load(space_path.read_text())
    except OSError as error:
        raise SearchSpaceError(f"search space {space_path}: cannot read: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise SearchSpaceError(f"search space {space_path}: not valid YAML: {error}") from None
    space = space_from_dict(space_data, base, source=f"search space {space_path}")
    check_space_for_search(space)
    for flag, value in (("--num-samples", args.num_samples), ("--grace-period", args.grace_period),
                        ("--reduction-factor", args.reduction_factor - 1)):
        if value < 1:
            raise ConfigError(f"{flag} must be {'> 1' if flag == '--reduction-factor' else '>= 1'}")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError("--max-concurrent must be >= 1")
    settings = SearchSettings(
        manifest=str(Path(args.manifest).resolve()), base_config=base.to_dict(), space=space_data,
        space_source=str(space_path), storage_path=str(Path(args.storage_path).resolve()),
        name=args.name or f"{datetime.now():%Y%m%d-%H%M%S}-{base.task}", num_samples=args.num_samples,
        searcher=args.searcher, metric=args.metric, mode=args.mode, grace_period=args.grace_period,
        reduction_factor=args.reduction_factor, max_concurrent=args.max_concurrent, seed=args.seed,
        device=args.device, tile_actors_per_worker=args.tile_actors_per_worker, torch_threads=args.torch_threads,
        max_failures=args.max_failures,
        train_poll_interval_s=args.train_poll_s, cache_dir=str(Path(args.cache_dir).resolve()) if args.cache_dir
        else None, mlflow_uri=args.mlflow_uri, experiment=args.experiment,
        model_name=args.model_name, model_alias=args.model_alias, register=not args.no_register,
    )
    settings.trial_run()  # the trials' run settings, refused now by the training job's rules
    return settings


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        if args.resume:
            settings = SearchSettings.load(args.resume)
            settings.search_space()  # the stored space is checked again before anything starts
        else:
            settings = settings_from_args(args)
            if (settings.experiment_dir / SETTINGS_FILE).exists():
                raise ConfigError(f"{settings.experiment_dir} already holds a search; pass --resume "
                                  f"{settings.experiment_dir} to continue it, or choose another --name")
    except (ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        outcome = run_search(settings, resume=bool(args.resume), restart_errored=args.restart_errored)
    except KeyboardInterrupt:
        print(f"[tune] interrupted; continue with --resume {settings.experiment_dir}", file=sys.stderr)
        return 130
    if not outcome.rows or all(r.status == "ERROR" for r in outcome.rows):
        print("error: every trial failed; see the table and Tune's logs in " f"{outcome.experiment_dir}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
