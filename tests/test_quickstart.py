"""The README's main command in a reduced size: the whole product end to end, as a newcomer runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path: Path) -> None:
    workdir = tmp_path / "quickstart"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(
        [sys.executable, "-m", "dual_attention_cli.main", "quickstart", "--workdir", str(workdir),
         "--n-slides", "8", "--slide-px", "2048", "--epochs", "1", "--steps-per-epoch", "2", "--port", "0"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    # A registered model in the local MLflow store, with the alias Serve loaded.
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}",
                                 registry_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    version = client.get_model_version_by_alias("dual-attention-her2", "candidate")
    assert str(version.version) == "1"

    # An HTTP score of a held-out slide, and a non-empty overlay PNG.
    summary = json.loads((workdir / "quickstart-summary.json").read_text())
    score = summary["http_score"]
    assert score["predicted_label"] in ("0", "1+", "2+", "3+")
    assert abs(sum(score["class_probabilities"]) - 1) < 1e-4
    assert score["tiles"] and 0 < score["fraction_level0_read"] < 1
    assert score["model"]["version"] == "1"
    overlay = workdir / "overlay.png"
    assert overlay.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and overlay.stat().st_size > 1000
    assert summary["evaluation"]["n_slides"] >= 1
    assert "mlflow ui --backend-store-uri" in done.stdout
