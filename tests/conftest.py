"""Shared fixtures: the real slide files in ../shared/slides and one local Ray cluster per session."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray instance for the whole session, on 127.0.0.1, with logical CPUs for 2 train
    workers, tile actors and Serve replicas on a 2-core machine."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # a fresh instance even when another `ray start` cluster runs on this machine
            num_cpus=8,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            runtime_env={"env_vars": {"PYTHONPATH": str(PROJECT_ROOT)}},
            log_to_driver=False,
        )
    yield
    ray.shutdown()


@pytest.fixture(autouse=True, scope="session")
def model_cache_in_a_temp_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Registered models the tests load are cached in the session's temp folder, not the user's
    ~/.cache/dual-attention/models (jobs.tracking.model_cache_dir); set before Ray starts, so that Ray
    workers inherit it too."""
    # jobs.tracking.MODEL_CACHE_ENV, spelled out: importing jobs.tracking would import MLflow in every session
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
