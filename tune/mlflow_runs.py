"""The search in MLflow: one parent run for the search, one child run per trial, the best model registered.

All MLflow writes happen in the search's driver (as in the training job, whose workers never touch
MLflow): Tune calls ``TrialRunsInMlflow`` there with each trial's start, every reported epoch and its
end. A child run carries ``mlflow.parentRunId`` (the MLflow UI nests it under the search) and
``tune_trial_id``; a resumed search finds a trial's child run by those tags instead of opening a second
one. A child run's params are the trial's searched values under their config field names; its metrics
are the training job's per-epoch metrics, step = epoch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ray.tune.logger import LoggerCallback

from jobs.runtime import tracking
from tune.trial import EPOCHS_DONE

PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "tune_trial_id"


def _client(tracking_uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def start_parent_run(tracking_uri: str, experiment_id: str, run_name: str, params: dict[str, Any],
                     tags: dict[str, str]) -> str:
    """Create the search's parent run (status RUNNING) with its params; returns its id."""
    from mlflow.entities import Param

    client = _client(tracking_uri)
    run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags, search="true"))
    flat = tracking.flatten_params(params)
    items = [Param(k, v[:6000]) for k, v in flat.items()]
    for start in range(0, len(items), 100):  # MLflow's batch limit is 100 params
        client.log_batch(run.info.run_id, params=items[start:start + 100])
    return run.info.run_id


def child_run_id(tracking_uri: str, experiment_id: str, parent_run_id: str, trial_id: str) -> str | None:
    """The child run of ``trial_id`` under ``parent_run_id``, if the search already opened one."""
    runs = _client(tracking_uri).search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.{TRIAL_TAG} = '{trial_id}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


class TrialRunsInMlflow(LoggerCallback):
    """Tune callback (driver side): a child MLflow run per trial under the search's parent run."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, epochs: int) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.epochs = epochs
        self._runs: dict[str, str] = {}  # trial id -> run id

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks into the experiment state
        return dict(self.__dict__, _runs={})

    def _run_for(self, trial: Any) -> str:
        run_id = self._runs.get(trial.trial_id) or child_run_id(
            self.tracking_uri, self.experiment_id, self.parent_run_id, trial.trial_id)
        client = _client(self.tracking_uri)
        if run_id is None:
            tags = {PARENT_TAG: self.parent_run_id, TRIAL_TAG: trial.trial_id}
            run_id = client.create_run(self.experiment_id, run_name=str(trial), tags=tags).info.run_id
            params = {name: str(value) for name, value in trial.config.items()}
            client.log_batch(run_id, params=[_param(k, v) for k, v in params.items()])
        elif client.get_run(run_id).info.status != "RUNNING":  # a trial restarted by a resumed search
            client.update_run(run_id, status="RUNNING")
        self._runs[trial.trial_id] = run_id
        return run_id

    def log_trial_start(self, trial: Any) -> None:
        self._run_for(trial)

    def log_trial_result(self, iteration: int, trial: Any, result: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        run_id = self._run_for(trial)
        step = int(result.get(EPOCHS_DONE, iteration)) - 1
        now_ms = int(time.time() * 1000)
        metrics = [Metric(k, v, now_ms, step) for k, v in tracking.numeric_metrics(result).items()]
        client = _client(self.tracking_uri)
        for start in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[start:start + 1000])

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        run_id = self._run_for(trial)
        client = _client(self.tracking_uri)
        epochs_done = int((trial.last_result or {}).get(EPOCHS_DONE, 0))
        client.set_tag(run_id, EPOCHS_DONE, str(epochs_done))
        client.set_tag(run_id, "stopped_early", str(not failed and epochs_done < self.epochs).lower())
        client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def _param(key: str, value: str) -> Any:
    from mlflow.entities import Param

    return Param(key, value[:6000])


def finish_parent_run(tracking_uri: str, parent_run_id: str, metrics: dict[str, float], tags: dict[str, str],
                      artifacts: list[Path], status: str = "FINISHED") -> None:
    from mlflow.entities import Metric

    client = _client(tracking_uri)
    now_ms = int(time.time() * 1000)
    values = [Metric(k, v, now_ms, 0) for k, v in tracking.numeric_metrics(metrics).items()]
    if values:
        client.log_batch(parent_run_id, metrics=values)
    for key, value in tags.items():
        client.set_tag(parent_run_id, key, value)
    for path in artifacts:
        client.log_artifact(parent_run_id, str(path))
    client.set_terminated(parent_run_id, status=status)


def register_best(tracking_uri: str, child_run: str, checkpoint_dir: str | Path, class_names: tuple[str, ...],
                  model_name: str, alias: str, tags: dict[str, str]) -> tracking.RegisteredModel:
    """Log the best trial's checkpoint as a model in that trial's child run and register it under ``alias``."""
    import mlflow

    previous_status = _client(tracking_uri).get_run(child_run).info.status
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    with mlflow.start_run(run_id=child_run):
        registered = tracking.register_model(checkpoint_dir, class_names, model_name, alias, tags=tags)
        mlflow.set_tag("registered_model", f"{registered.name}/{registered.version}@{registered.alias}")
    _client(tracking_uri).set_terminated(child_run, status=previous_status if previous_status != "RUNNING"
                                         else "FINISHED")
    return registered
