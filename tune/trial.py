"""One trial of the search: the training job's ``TorchTrainer`` with the trial's config, reporting to Tune.

Ray 2.60 runs Ray Train V2, where ``Tuner(TorchTrainer(...))`` is gone: the trial is a plain Tune
function (``train_trial``) that builds the config from the sampled values, and fits one fold of the
training job (``jobs.train.fit_fold``, the same trainer ``dual-attention train`` runs). Every epoch the
training workers call ``ray.train.report``; Tune's ``TuneReportCallback``, given to the trainer's
``RunConfig``, forwards rank 0's metrics (and the checkpoint's path) from the Train controller to the
trial's Tune session, so that ASHA sees each epoch while the trainer is still fitting.

A trial's Ray Train storage is ``<experiment>/trial_runs/<trial id>/ray/fold<k>``. A trial Tune restarts
after an interruption fits the same Train run again, which continues after its last checkpointed epoch;
``epochs_done`` (added to every report) is therefore the scheduler's clock, not Tune's per-session
iteration counter.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from tune.space import SearchSpace

TRIAL_DRIVER_CPUS = 0.1  # the trial's own actor only waits on the Train controller
EPOCHS_DONE = "epochs_done"


@dataclass
class TrialJob:
    """What every trial needs besides its sampled values; handed to trials with ``tune.with_parameters``."""

    space: SearchSpace
    cohort: Any  # jobs.train.PreparedCohort: thumbnails and masks already in the object store
    run: Any  # jobs.train.TrainRun shared by every trial (device resolved); its run_dir is the trials' folder
    ledger_name: str  # tune.cleanup.PlacementGroupLedger of this search


class ReportEpochsToTune(TuneReportCallback):
    """``TuneReportCallback`` plus ``epochs_done`` (epoch + 1), the scheduler's time axis."""

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        metrics = [dict(m, **{EPOCHS_DONE: int(m["epoch"]) + 1}) for m in metrics]
        super().after_report(run_context, metrics, checkpoint)


def train_trial(sampled: dict[str, Any], job: TrialJob) -> None:
    """The Tune function: fit the training job with this trial's config; epochs report through callbacks."""
    import ray
    from ray import tune

    from jobs.train import fit_fold
    from tune.cleanup import RecordPlacementGroup

    config = job.space.trial_config(sampled)
    trial_id = tune.get_context().get_trial_id()
    ledger = ray.get_actor(job.ledger_name)
    run = dataclasses.replace(job.run, run_dir=Path(job.run.run_dir) / trial_id)
    fit_fold(config, job.cohort, run, config.train.val_fold,
             callbacks=[ReportEpochsToTune(), RecordPlacementGroup(ledger, trial_id)])


def trial_resources(num_workers: int, tile_actors_per_worker: int, use_gpu: bool) -> dict[str, float]:
    """Logical resources one trial holds: its own actor, the Train workers, their tile-reader actors."""
    from jobs.runtime.tile_plane import DEFAULT_ACTOR_NUM_CPUS

    worker_cpus = 0.0 if use_gpu else 1.0  # Ray Train's default: a GPU worker asks for the GPU only
    cpus = TRIAL_DRIVER_CPUS + num_workers * (worker_cpus + tile_actors_per_worker * DEFAULT_ACTOR_NUM_CPUS)
    return {"CPU": cpus, "GPU": float(num_workers) if use_gpu else 0.0}


def max_concurrent_trials(cluster: dict[str, float], per_trial: dict[str, float]) -> int:
    """How many trials fit the cluster at once (at least one: a single trial waits for resources)."""
    fits = math.floor(float(cluster.get("CPU", 0.0)) / per_trial["CPU"] + 1e-9)
    if per_trial.get("GPU", 0.0) > 0:
        fits = min(fits, math.floor(float(cluster.get("GPU", 0.0)) / per_trial["GPU"] + 1e-9))
    return max(1, fits)
