"""The one rule for starting or joining Ray (jobs/runtime/cluster.py)."""

from __future__ import annotations

import pytest

from jobs.runtime.cluster import RayAddressError, cluster_address, start_ray


def test_an_explicit_address_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert cluster_address("10.0.0.2:6379") == "10.0.0.2:6379"
    assert cluster_address() == "10.0.0.1:6379"  # a submitted job's driver has it set
    assert cluster_address("local") is None  # a private instance whatever $RAY_ADDRESS says


def test_no_address_means_a_private_instance(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address() is None
    monkeypatch.setenv("RAY_ADDRESS", "")
    assert cluster_address() is None


def test_a_dashboard_url_is_refused_naming_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    with pytest.raises(RayAddressError, match=r"\$RAY_ADDRESS=http://head:8265 is a dashboard URL.*ray job submit"):
        cluster_address()
    with pytest.raises(RayAddressError, match=r"--address=https://head:8265"):
        cluster_address("https://head:8265")


def test_workers_are_told_the_address_of_their_cluster(ray_cluster: None) -> None:
    """The session's instance is started by start_ray: its workers find their cluster in $RAY_ADDRESS
    instead of searching the machine (which warned "Found multiple active Ray instances")."""
    import os

    import ray

    @ray.remote(num_cpus=0)
    def address_seen_by_a_worker() -> str | None:
        return os.environ.get("RAY_ADDRESS")

    seen = ray.get(address_seen_by_a_worker.remote())
    assert seen is not None
    assert seen.rsplit(":", 1)[1] == ray.get_runtime_context().gcs_address.rsplit(":", 1)[1]
    assert start_ray() is False  # already initialised: nothing started, nothing for this caller to shut down


def test_restored_environ_puts_set_and_unset_variables_back(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from jobs.runtime.cluster import restored_environ

    monkeypatch.setenv("DA_TEST_SET", "before")
    monkeypatch.delenv("DA_TEST_UNSET", raising=False)
    with pytest.raises(RuntimeError), restored_environ(("DA_TEST_SET", "DA_TEST_UNSET")):
        os.environ["DA_TEST_SET"], os.environ["DA_TEST_UNSET"] = "during", "during"
        raise RuntimeError("the block fails")
    assert os.environ["DA_TEST_SET"] == "before" and "DA_TEST_UNSET" not in os.environ
