"""MLflow helpers (local sqlite store, params, registration, loading by alias) and overlay pictures."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dual_attention.checkpoint import save_checkpoint
from dual_attention.config import preset
from dual_attention.models import DualAttentionModel
from dual_attention.overlays import overlay_tiles, render_overlay, save_slide_score_overlay
from dual_attention.pipeline import SlideScore, TileScore
from dual_attention.slides import Level0Box
from jobs.runtime import tracking


def test_tracking_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri(tmp_path) == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.resolve_tracking_uri(tmp_path) == "http://127.0.0.1:5000"
    assert tracking.resolve_tracking_uri(tmp_path, "sqlite:////x/y.db") == "sqlite:////x/y.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(ValueError, match="--mlflow-uri"):
        tracking.resolve_tracking_uri(None)


def test_config_flattens_to_dotted_params_and_only_finite_numbers_are_metrics() -> None:
    config = preset("cpu-small")
    flat = tracking.flatten_params(config.to_dict())
    assert flat["loss.alpha"] == "0.5" and flat["train.mode"] == "joint" and flat["task"] == "her2"
    assert not any(isinstance(v, dict) for v in flat.values())
    assert len(flat) == sum(len(v) if isinstance(v, dict) else 1 for v in config.to_dict().values())
    metrics = tracking.numeric_metrics({"a": 1, "b": 2.5, "c": float("nan"), "d": "text", "e": True})
    assert metrics == {"a": 1.0, "b": 2.5}


def test_load_registered_model_refuses_an_unknown_reference(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither models:/NAME@ALIAS"):
        tracking.load_registered_model(tmp_path / "nothing-here")


@pytest.mark.slow
def test_register_then_load_by_alias_and_predict_through_pyfunc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  shared_slides: Path) -> None:
    import mlflow
    import pandas as pd

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = preset("cpu-small")
    model = DualAttentionModel(config)
    checkpoint = save_checkpoint(tmp_path / "ckpt", model, config, extra={"epoch": 4}).parent
    run_dir = tmp_path / "run"
    tracking.setup_mlflow(run_dir, experiment="tracking-test")
    try:
        with mlflow.start_run(run_name="t") as run:
            tracking.log_config(config)
            tracking.log_metrics({"loss": 1.5, "skip": float("nan")}, step=3)
            registered = tracking.register_model(checkpoint, config.class_names, "dual-attention-test", "candidate")
        client = mlflow.MlflowClient()
        data = client.get_run(run.info.run_id).data
        assert data.params["loss.alpha"] == "0.5" and data.params["config_digest"] == config.digest()
        assert data.metrics == {"loss": 1.5}
        assert registered.version == "1" and registered.model_uri == "models:/dual-attention-test@candidate"
        assert (run_dir / "mlflow.db").is_file() and (run_dir / "mlartifacts").is_dir()

        loaded, loaded_config, meta = tracking.load_registered_model(registered.model_uri)
        assert meta == {"name": "dual-attention-test", "version": "1", "alias": "candidate",
                        "source": meta["source"]}
        assert loaded_config.digest() == config.digest()
        for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True):
            assert np.array_equal(a.numpy(), b.numpy())
        by_path, _, path_meta = tracking.load_registered_model(checkpoint)
        assert path_meta["version"] is None and path_meta["source"] == str(checkpoint.resolve())

        # the registered pyfunc scores a real slide file by itself, with the signature's columns
        pyfunc = mlflow.pyfunc.load_model(registered.model_uri)
        assert [c.name for c in pyfunc.metadata.get_input_schema().inputs] == ["slide_path", "seed"]
        slide = str(shared_slides / "aperio" / "CMU-1-Small-Region.svs")
        frame = pyfunc.predict(pd.DataFrame({"slide_path": [slide], "seed": [5]}))
        assert list(frame.columns) == tracking.output_columns(config.class_names)
        direct = tracking.score_slide_file(loaded, loaded_config, slide, seed=5)
        assert frame.iloc[0]["predicted_class"] == direct["predicted_class"]
        assert frame.iloc[0]["prob_3+"] == pytest.approx(direct["prob_3+"])
    finally:
        mlflow.set_tracking_uri(None)


def test_a_model_registers_in_its_runs_store_whatever_registry_an_earlier_run_left_set(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mlflow keeps the registry URI global (and exports it): after a run on store A in this process, a
    model logged in a run on store B must still register in B."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    config = preset("cpu-small")
    checkpoint = save_checkpoint(tmp_path / "ckpt", DualAttentionModel(config), config).parent
    store_a, store_b = tracking.sqlite_uri(tmp_path / "a.db"), tracking.sqlite_uri(tmp_path / "b.db")
    previous_registry = mlflow.get_registry_uri()
    try:
        tracking.setup_mlflow(tmp_path / "run-a", uri=store_a, experiment="a")  # sets the registry to A
        mlflow.set_tracking_uri(store_b)  # a caller that only moves the tracking URI, as the serve tests do
        mlflow.set_experiment("b")
        with mlflow.start_run():
            registered = tracking.register_model(checkpoint, config.class_names, "in-b", alias="champion")
        in_b = mlflow.MlflowClient(tracking_uri=store_b, registry_uri=store_b)
        assert str(in_b.get_model_version_by_alias("in-b", "champion").version) == registered.version == "1"
        in_a = mlflow.MlflowClient(tracking_uri=store_a, registry_uri=store_a)
        assert in_a.search_registered_models() == []
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(previous_registry)


@pytest.mark.slow
def test_loading_one_registered_version_twice_keeps_one_cached_copy_and_none_in_the_temp_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cache = tmp_path / "model-cache"
    monkeypatch.setenv(tracking.MODEL_CACHE_ENV, str(cache))
    system_temp = tmp_path / "system-temp"
    system_temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_temp))
    config = preset("cpu-small")
    checkpoint = save_checkpoint(tmp_path / "ckpt", DualAttentionModel(config), config, extra={"epoch": 0}).parent
    tracking.setup_mlflow(tmp_path / "run", experiment="cache-test")
    try:
        with mlflow.start_run():
            registered = tracking.register_model(checkpoint, config.class_names, "dual-attention-cache", "candidate")
        uri = mlflow.get_tracking_uri()
        before = set(system_temp.iterdir())
        _, _, first = tracking.load_registered_model(registered.model_uri, tracking_uri=uri)
        (entry,) = cache.iterdir()  # one copy, no partial download left behind
        assert entry.name.startswith("dual-attention-cache-v1-")
        model_file = Path(first["source"]) / "model.pt"
        written = model_file.stat().st_mtime_ns
        loaded, _, second = tracking.load_registered_model("models:/dual-attention-cache/1", tracking_uri=uri)
        assert second["source"] == first["source"] and Path(first["source"]).is_relative_to(entry)
        assert [p.name for p in cache.iterdir()] == [entry.name]
        assert model_file.stat().st_mtime_ns == written  # read from the cache, not downloaded again
        assert set(system_temp.iterdir()) == before  # nothing left in the temp folder
        assert loaded.training is False
    finally:
        mlflow.set_tracking_uri(None)


def _fake_score(thumbnail_hw: tuple[int, int], downsample: int) -> SlideScore:
    height, width = thumbnail_hw
    attention = np.random.default_rng(0).random((height, width))
    boxes = [Level0Box(0, 0, 256, 256), Level0Box(width * downsample - 256, height * downsample - 256, 256, 256)]
    tiles = [TileScore(level0_box=b, attention_weight=0.5, predicted_class=i, class_probabilities=[0.7, 0.3],
                       glimpse_trail_level0=[(b.x0 + 10.0, b.y0 + 10.0), (b.x0 + 200.0, b.y0 + 128.0)])
             for i, b in enumerate(boxes)]
    return SlideScore(predicted_class=0, predicted_label="intact", class_probabilities=[0.6, 0.4], confidence=0.6,
                      tiles=tiles, attention_map=attention / attention.sum(), level0_pixels_read=2 * 256 * 256,
                      fraction_level0_read=0.1)


def test_overlay_png_shows_the_tiles_where_they_are(tmp_path: Path) -> None:
    thumbnail = np.full((48, 64, 3), 255, np.uint8)
    score = _fake_score((48, 64), 32)
    path = save_slide_score_overlay(tmp_path / "o.png", thumbnail, score, 32, title="t", class_names=("a", "b"))
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[0] > 100 and image.shape[1] > 400  # two panels
    # tile colours (cyan for tile 1) appear on a white thumbnail only because boxes were drawn
    cyan = (image[..., 0] < 60) & (image[..., 1] > 200) & (image[..., 2] > 200)
    assert cyan.sum() > 20


def test_overlay_refuses_mismatched_inputs_by_name() -> None:
    thumbnail = np.zeros((48, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="attention_map shape"):
        render_overlay(thumbnail, np.zeros((10, 10)), [], 32)
    # Glimpse trails now travel with their tile (OverlayTile); the per-tile inputs that can mismatch are images.
    with pytest.raises(ValueError, match="0 tile images for 2 tiles"):
        overlay_tiles(_fake_score((48, 64), 32), tile_images=[])


# Opens the shared store from a run folder of its own once told to go, logs one artifact, prints where.
_OPEN_SHARED_STORE = """
import json, sys, time
import json
import time
from pathlib import Path
import mlflow
from jobs.runtime import tracking
uri, run_dir, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
ready.touch()
while not go.exists():
    time.sleep(0.01)
tracking.setup_mlflow(run_dir, uri, "shared")
with mlflow.start_run() as run:
    mlflow.log_text(run_dir.name, "note.txt")
print(json.dumps({"run_id": run.info.run_id, "artifact_uri": run.info.artifact_uri}))
"""


@pytest.mark.slow
def test_two_processes_open_a_fresh_shared_sqlite_store_at_once_and_keep_their_artifacts_apart(
    tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys
    from urllib.parse import urlparse

    from mlflow import MlflowClient

    store = tmp_path / "store"
    uri = tracking.sqlite_uri(store / "mlflow.db")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("MLFLOW_TRACKING_URI", None)
    go = tmp_path / "go"
    processes = [subprocess.Popen([sys.executable, "-c", _OPEN_SHARED_STORE, uri, str(tmp_path / name),
                                   str(tmp_path / f"{name}.ready"), str(go)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for name in ("run-a", "run-b")]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"{name}.ready").exists() for name in ("run-a", "run-b")):  # both imported
        assert time.monotonic() < deadline, "the store-opening processes did not start within 120 s"
        assert all(p.poll() is None for p in processes), [p.communicate() for p in processes]
        time.sleep(0.05)
    go.touch()  # both open the fresh store now
    outputs = [p.communicate(timeout=120) for p in processes]
    for process, (_out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-3000:]
    runs = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]

    client = MlflowClient(tracking_uri=uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "shared"]
    assert sorted(r.info.run_id for r in client.search_runs([experiment.experiment_id])) == sorted(
        r["run_id"] for r in runs)
    folders = [Path(urlparse(r["artifact_uri"]).path) for r in runs]
    for folder, run, name in zip(folders, runs, ("run-a", "run-b"), strict=True):
        # under the store, in the run's own folder; never inside either run folder
        assert folder.is_relative_to((store / "mlartifacts").resolve()) and run["run_id"] in folder.parts
        assert (folder / "note.txt").read_text() == name
        assert not any(folder.is_relative_to((tmp_path / other).resolve()) for other in ("run-a", "run-b"))
    assert folders[0] != folders[1]


def test_every_job_that_loads_a_model_names_it_with_the_same_flags() -> None:
    """score, score-cohort, evaluate and the random-sampling baseline take --model and --mlflow-uri from one
    declaration (``config.add_model_flags``): same names, help and defaults."""
    import argparse

    from jobs import baselines, evaluate, score, score_cohort

    def model_flags(parser: argparse.ArgumentParser) -> list[tuple]:
        return [(tuple(a.option_strings), a.required, a.default, a.help) for a in parser._actions
                if set(a.option_strings) & {"--model", "--mlflow-uri"}]

    random_parser = baselines.build_parser()._subparsers._group_actions[0].choices["random"]
    flags = [model_flags(p) for p in (score.build_parser(), score_cohort.build_parser(), evaluate.build_parser(),
                                      random_parser)]
    assert len(flags[0]) == 2 and all(f == flags[0] for f in flags), flags
