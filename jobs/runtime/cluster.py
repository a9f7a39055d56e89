"""One rule for starting or joining Ray, for every entry point: the jobs, tune, serve, the quickstart, the tests.

- An explicit address (``--address``) or ``$RAY_ADDRESS`` (a submitted Ray job always has it) joins that
  cluster. A dashboard URL (``http://HEAD:8265``) is what ``ray job submit`` wants, not ``ray.init``: it is
  refused naming the fix rather than mistaken for a Ray Client address.
- Otherwise a private instance on 127.0.0.1 (``address="local"``), never whatever ``ray start`` cluster
  happens to run on this machine, with logical CPUs so that 2 Train workers, their tile readers and Serve
  replicas fit on a 2-core machine.
- Either way the workers get the cluster's address in ``runtime_env`` ``env_vars``: without it, Ray's own
  code inside them (Train's controller asking the state API about its actors) searches the machine for a
  cluster, warns "Found multiple active Ray instances" when several run (counted 88 times in one test
  run) and may ask the wrong one.
- Token authentication is left as Ray ships it (on for a new local instance since 2.52; the token is read
  from ``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``). Only the test suite turns it
  off for its own private instance (tests/conftest.py).

Imports Ray lazily: the CLI's ``--help`` and the core never pay for it.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

LOCAL_HOST = "127.0.0.1"
ADDRESS_ENV = "RAY_ADDRESS"
# Ray reads the GCS port of a new head node from this variable (ray._private.ray_constants
# GCS_PORT_ENVIRONMENT_VARIABLE); choosing it ourselves lets the workers' runtime_env name the address.
_GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"
_GCS_WAIT_ENV = "RAY_gcs_server_port_wait_time_s"
_GCS_WAIT_S = "50"
# The default logical CPUs of a private instance: 2 Train workers + tile readers + Serve replicas.
MIN_LOCAL_CPUS = 4


class RayAddressError(ValueError):
    """An address ``ray.init`` cannot join (named, with what to use instead)."""


def cluster_address(address: str | None = None) -> str | None:
    """The cluster to join: ``address``, else ``$RAY_ADDRESS``, else None (start a private instance).
    ``"local"`` means a private instance whatever ``$RAY_ADDRESS`` says."""
    chosen = address or os.environ.get(ADDRESS_ENV) or None
    if chosen == "local":
        return None
    if chosen is not None and chosen.startswith(("http://", "https://")):
        source = "--address" if address else f"${ADDRESS_ENV}"
        raise RayAddressError(
            f"{source}={chosen} is a dashboard URL, which `ray job submit` uses; to run on that cluster, "
            f"submit this command with `ray job submit -- python -m ...` (the job gets the right address), "
            f"or give the cluster's GCS address (HEAD:6379)")
    return chosen


def _free_local_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOCAL_HOST, 0))
        return int(sock.getsockname()[1])


def _with_env_var(runtime_env: Mapping[str, Any] | None, name: str, value: str) -> dict[str, Any]:
    merged = dict(runtime_env or {})
    env_vars = dict(merged.get("env_vars") or {})
    env_vars.setdefault(name, value)  # a caller's own value wins
    merged["env_vars"] = env_vars
    return merged


def start_ray(*, address: str | None = None, num_cpus: float | None = None,
              runtime_env: Mapping[str, Any] | None = None, log_to_driver: bool = True,
              include_dashboard: bool = False, **init_kwargs: Any) -> bool:
    """Join or start Ray by the rule above, unless this process already has Ray initialised.

    Returns True when this call started the connection (so the caller shuts it down), False when Ray was
    already initialised (the caller's caller owns it). ``num_cpus`` applies to a private instance only
    (default ``max(MIN_LOCAL_CPUS, os.cpu_count())``); ``init_kwargs`` go to ``ray.init`` as they are.
    """
    import ray

    if ray.is_initialized():
        return False
    # Ray 2.60 would otherwise re-run every worker under `uv run` when the driver was started by uv.
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    joined = cluster_address(address)
    kwargs: dict[str, Any] = {"log_to_driver": log_to_driver, **init_kwargs}
    if joined is not None:
        kwargs["address"] = joined
        if joined != "auto" and not joined.startswith("ray://"):
            kwargs["runtime_env"] = _with_env_var(runtime_env, ADDRESS_ENV, joined)
        elif runtime_env:
            kwargs["runtime_env"] = dict(runtime_env)
        ray.init(**kwargs)
        return True

    node_ip = kwargs.setdefault("_node_ip_address", LOCAL_HOST)
    port = _free_local_port()
    kwargs.update(address="local", include_dashboard=include_dashboard,
                  num_cpus=num_cpus or max(MIN_LOCAL_CPUS, os.cpu_count() or 1),
                  runtime_env=_with_env_var(runtime_env, ADDRESS_ENV, f"{node_ip}:{port}"))
    # A fixed GCS port skips Ray's wait for the port file (30 s), leaving only its connect retries (about
    # 20 s): give those the old budget, so that a start on a loaded machine is not cut shorter than before.
    start_env = {_GCS_PORT_ENV: str(port), _GCS_WAIT_ENV: os.environ.get(_GCS_WAIT_ENV, _GCS_WAIT_S)}
    with restored_environ(start_env):
        os.environ.update(start_env)
        ray.init(**kwargs)
    return True


@contextlib.contextmanager
def restored_environ(names: Iterable[str]) -> Iterator[None]:
    """Puts the variables ``names`` back as they were (set or unset) when the block ends, whatever it set."""
    previous = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class RaySession:
    """``start_ray`` as a context manager: shuts down on exit only what it started."""

    def __init__(self, **start_kwargs: Any) -> None:
        self.started = start_ray(**start_kwargs)

    def __enter__(self) -> RaySession:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.started:
            import ray

            ray.shutdown()
