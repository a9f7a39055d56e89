"""The session's Ray fixture on a loaded machine: start-up is retried, and a Ray that never starts is
reported once, not as one full error per test that needs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# A stand-in for Ray whose start-up always times out, as Ray's did on a loaded 2-core machine.
_FAKE_RAY = """
attempts = []


def is_initialized():
    return False


def init(**kwargs):
    attempts.append(kwargs)
    raise TimeoutError(f"start-up timed out (attempt {len(attempts)})")


def shutdown():
    pass
"""

_TESTS = """
import pytest


@pytest.mark.parametrize("i", range(3))
def test_needs_ray(ray_cluster, i):
    pass


def test_without_ray():
    pass
"""


def test_a_ray_that_never_starts_is_retried_and_its_cause_reported_once(tmp_path: Path) -> None:
    conftest = (Path(__file__).parent / "conftest.py").read_text()
    assert "RAY_RETRY_PAUSE_S = 10.0" in conftest
    (tmp_path / "conftest.py").write_text(conftest.replace("RAY_RETRY_PAUSE_S = 10.0", "RAY_RETRY_PAUSE_S = 0.0"))
    (tmp_path / "test_uses_ray.py").write_text(_TESTS)
    fake = tmp_path / "fake" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(_FAKE_RAY)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                            # the fake Ray first; the project after it, for conftest's jobs.runtime.cluster
                            cwd=tmp_path, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                [str(tmp_path / "fake"), str(Path(__file__).resolve().parents[1])])),
                            capture_output=True, text=True, timeout=300)
    out = result.stdout
    assert "1 passed, 3 errors" in out, out[-3000:]
    # The errors' reports, without pytest's closing summary: that repeats each error's message, in full
    # where $CI is set (as in CI) and cut to the terminal's width elsewhere.
    reports = out.split("short test summary info")[0]
    # every attempt's cause, shown in the first error only
    assert reports.count("attempt 1: TimeoutError: start-up timed out (attempt 1)") == 1, out[-3000:]
    assert reports.count("attempt 3: TimeoutError: start-up timed out (attempt 3)") == 1, out[-3000:]
    assert reports.count("Ray did not start; the cause is reported at test_uses_ray.py::test_needs_ray[0]") == 2
