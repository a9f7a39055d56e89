"""The training entry point runs unchanged as a Ray job: a real `ray start` cluster (with the dashboard, which
the Jobs API needs), `JobSubmissionClient.submit_job(entrypoint="python -m jobs.train ...")` with the project
as working_dir, MLflow pointed at a sqlite file through the job's environment; the job runs k-fold
cross-validation (--all-folds) so the parent/fold runs and the per-fold aliases are checked too.

The cluster gets its own --temp-dir, so no other `ray.init()` on this machine finds it, and it is stopped by
killing exactly the processes whose command line names that folder (`ray stop` would stop every Ray
instance on the machine, other people's included)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_pids(temp_dir: str) -> list[int]:
    """Processes whose command line names this cluster's temp folder (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmdline:
            pids.append(int(entry.name))
    return pids


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _stop_cluster(temp_dir: str) -> None:
    """SIGTERM, then SIGKILL, each process of this cluster only (found by its unique temp folder)."""
    _signal(_cluster_pids(temp_dir), signal.SIGTERM)
    deadline = time.monotonic() + 8
    while _cluster_pids(temp_dir) and time.monotonic() < deadline:
        time.sleep(0.5)
    _signal(_cluster_pids(temp_dir), signal.SIGKILL)


@pytest.fixture(scope="module")
def job_cluster() -> Iterator[str]:
    """A head node on 127.0.0.1 with the dashboard; yields the dashboard's http address."""
    temp_dir = tempfile.mkdtemp(prefix="rjob", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    # Every port the head opens is chosen free: other Ray instances on this machine may hold the defaults
    # (a taken dashboard-agent port leaves the Jobs API with "No available agent").
    ports = {name: _free_port() for name in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                             "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                             "metrics-export-port", "ray-client-server-port")}
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
               "--num-cpus", "6", "--include-dashboard=true", "--dashboard-host", "127.0.0.1",
               "--temp-dir", temp_dir, "--disable-usage-stats"]
    command += [arg for name, port in ports.items() for arg in (f"--{name}", str(port))]
    try:
        subprocess.run(command, env=env, check=True, capture_output=True, timeout=180)
        address = f"http://127.0.0.1:{ports['dashboard-port']}"
        _wait_for_jobs_api(address)
        yield address
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_jobs_api(address: str, timeout_s: float = 120) -> None:
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            JobSubmissionClient(address).list_jobs()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def _submit_when_agent_ready(client, timeout_s: float = 120, **kwargs) -> str:  # noqa: ANN001
    """The head's dashboard answers before its job agent is up ("No available agent"): retry until it is."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as error:
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(2)


@pytest.mark.slow
def test_training_runs_as_a_ray_job_and_logs_to_the_given_mlflow(job_cluster: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    from dual_attention.synthetic import write_cohort

    manifest = write_cohort(tmp_path / "cohort", "her2", 8, seed=5, slide_level0_px=2048, n_folds=2, progress=False)
    tracking_uri = f"sqlite:///{tmp_path / 'jobs-mlflow.db'}"
    run_dir = tmp_path / "job-run"
    client = JobSubmissionClient(job_cluster)
    job_id = _submit_when_agent_ready(
        client,
        entrypoint=(f"python -m jobs.train --manifest {manifest} --epochs 1 --set train.steps_per_epoch=2 "
                    f"--num-workers 2 --run-dir {run_dir} --all-folds --overlays-per-epoch 1 --model-name job-model --tile-reader local"),
        runtime_env={
            "working_dir": str(PROJECT_ROOT),
            "excludes": [".venv", "data", "runs", ".git", "**/__pycache__", ".pytest_cache", ".ruff_cache"],
            "env_vars": {"MLFLOW_TRACKING_URI": tracking_uri, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"},
        },
    )
    deadline = time.monotonic() + 600  # two folds; generous for a loaded 2-core machine
    status = client.get_job_status(job_id)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, f"job {job_id} still {status}; logs:\n{client.get_job_logs(job_id)[-4000:]}"
        time.sleep(3)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-6000:]
    assert "[train] summary" in logs and "[train] epoch 1/1" in logs and "all (pooled)" in logs

    # the job's driver wrote to the MLflow store named in its environment, not to the run folder
    assert not (run_dir / "mlflow.db").exists()
    mlflow_client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiment = mlflow_client.get_experiment_by_name("dual-attention")
    runs = mlflow_client.search_runs([experiment.experiment_id])
    assert all(run.info.status == "FINISHED" for run in runs)
    # --all-folds: a parent run with the pooled metrics and one nested run per validation fold
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    folds = {r.data.tags["val_fold"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(folds) == ["0", "1"]
    assert parent.data.metrics["cv_n_slides"] == 8  # every slide validated once, by the fold that held it out
    for fold in folds.values():
        assert fold.data.params["train.epochs"] == "1"
        assert "val_accuracy" in fold.data.metrics and "train_l_j" in fold.data.metrics
    fold_versions = {k: mlflow_client.get_model_version_by_alias("job-model", f"candidate-fold{k}") for k in folds}
    assert sorted(str(v.version) for v in fold_versions.values()) == ["1", "2"]
    best = mlflow_client.get_model_version_by_alias("job-model", "candidate")
    assert str(best.version) in {"1", "2"}
    assert "[train] alias candidate -> job-model" in logs
