"""Shared fixtures: the real slide files in ../shared/slides and one local Ray cluster per session."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_SLIDES = PROJECT_ROOT.parent / "shared" / "slides"


@pytest.fixture(scope="session")
def shared_slides() -> Path:
    """The folder of real slide files; tests that need it skip where it is absent."""
    if not SHARED_SLIDES.is_dir():
        pytest.skip(f"real slide files not found at {SHARED_SLIDES} (they live beside the project, in ../shared/slides)")
    return SHARED_SLIDES


# Start-up of the session's Ray instance on a loaded machine: Ray waits 30 s for its GCS to bind a port
# (RAY_gcs_server_port_wait_time_s, raised here) and a fixed 30 s for the raylet to register, so a slow
# start is retried after a pause rather than failing every test that needs Ray.
RAY_START_ATTEMPTS = 3
RAY_GCS_PORT_WAIT_S = "120"
RAY_RETRY_PAUSE_S = 10.0


class RayDidNotStart(RuntimeError):
    """The session's Ray instance failed to start on every attempt."""


_ray_failure_reported_at: str | None = None  # the test whose error shows the cause; the others point to it


def _start_ray() -> None:
    import ray

    from jobs.runtime.cluster import start_ray

    causes: list[str] = []
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        try:
            start_ray(
                address="local",  # a fresh instance even when $RAY_ADDRESS or a `ray start` cluster is about
                num_cpus=8,
                runtime_env={"env_vars": {"PYTHONPATH": str(PROJECT_ROOT)}},
                log_to_driver=False,
            )
        except Exception as error:  # a start-up timeout under load, most often; try again after a pause
            causes.append(f"attempt {attempt}: {type(error).__name__}: {error}")
            with contextlib.suppress(Exception):
                ray.shutdown()  # the processes of the half-started instance
            if attempt < RAY_START_ATTEMPTS:
                time.sleep(RAY_RETRY_PAUSE_S * attempt)
            continue
        if causes:
            sys.stderr.write(f"[conftest] Ray started at attempt {attempt} after: {'; '.join(causes)}\n")
        return
    raise RayDidNotStart(f"Ray did not start for the tests in {RAY_START_ATTEMPTS} attempts "
                         f"(GCS port wait {RAY_GCS_PORT_WAIT_S} s):\n" + "\n".join(causes))


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray instance for the whole session, on 127.0.0.1, with logical CPUs for 2 train
    workers, tile actors and Serve replicas on a 2-core machine.

    Token authentication is off for this instance only (the product leaves it as Ray ships it, on): with
    it on, every test process and every CLI subprocess a test starts would need the token, and Ray would
    write one to the shared ~/.ray/auth_token that any `ray start` on the machine then picks up. The
    cluster-recipe test (test_cluster_recipe.py) runs its own cluster with authentication on."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", RAY_GCS_PORT_WAIT_S)
    from serve.settings import patient_serve_proxy

    patient_serve_proxy()
    import ray

    if not ray.is_initialized():
        _start_ray()
    yield
    ray.shutdown()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """A Ray that did not start is reported in full once; pytest re-raises a failed session fixture for
    every test that uses it, and those errors only point at the first."""
    global _ray_failure_reported_at
    outcome = yield
    report = outcome.get_result()
    if report.when != "setup" or call.excinfo is None or not call.excinfo.errisinstance(RayDidNotStart):
        return
    if _ray_failure_reported_at is None:
        _ray_failure_reported_at = item.nodeid
    else:
        report.longrepr = f"Ray did not start; the cause is reported at {_ray_failure_reported_at}"


@pytest.fixture(autouse=True, scope="session")
def model_cache_in_a_temp_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Registered models the tests load are cached in the session's temp folder, not the user's
    ~/.cache/dual-attention/models (jobs.runtime.tracking.model_cache_dir); set before Ray starts, so that Ray
    workers inherit it too."""
    # jobs.runtime.tracking.MODEL_CACHE_ENV, spelled out: importing jobs.runtime.tracking would import MLflow in every session
    MODEL_CACHE_ENV = "DUAL_ATTENTION_MODEL_CACHE"
    previous = os.environ.get(MODEL_CACHE_ENV)
    os.environ[MODEL_CACHE_ENV] = str(tmp_path_factory.mktemp("model-cache"))
    yield
    if previous is None:
        os.environ.pop(MODEL_CACHE_ENV, None)
    else:
        os.environ[MODEL_CACHE_ENV] = previous


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread in the test process: on 2 cores shared with Ray workers, torch's second
    thread spin-waits and a ResNet18 step runs 10-20x slower (measured); restored at the end."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
