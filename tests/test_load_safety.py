"""Nothing the project loads can execute code: every loading path meets a poisoned pickle.

The poison is a pickle whose ``__reduce__`` writes a marker file when unpickled. Each test first shows
the poison is live (an unrestricted ``torch.load`` does write the marker), then that the project's loader
refuses the file with an error naming it, and the marker never appears.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from dual_attention.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint, save_checkpoint
from dual_attention.config import CLASS_NAMES, preset
from dual_attention.models import DualAttentionModel


class _Poison:
    """Unpickling this writes ``marker``: the stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.write_text, (self.marker, "code ran on load\n"))


def _poison_file(path: Path, marker: Path, payload_key: str = "state_dict") -> Path:
    """A torch file whose dict holds the poison under ``payload_key``; checked to be live."""
    torch.save({"config": {}, payload_key: _Poison(marker)}, path)
    torch.load(path, weights_only=False)  # the unrestricted loader runs it...
    assert marker.read_text() == "code ran on load\n"
    marker.unlink()  # ...so its absence below means the project's loader did not
    return path


def _small_checkpoint(folder: Path) -> tuple[DualAttentionModel, Path]:
    config = preset("cpu-small")
    torch.manual_seed(0)
    model = DualAttentionModel(config).eval()
    save_checkpoint(folder, model, config, extra={"epoch": 4})
    return model, folder


def test_model_checkpoint_with_a_poisoned_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    _poison_file(folder / CHECKPOINT_FILE, marker)
    with pytest.raises(CheckpointError, match=r"ckpt/model\.pt: not a readable checkpoint"):
        load_checkpoint(folder)
    assert not marker.exists()


def _optimizer_after_a_step(model: DualAttentionModel) -> tuple[torch.optim.Optimizer, object]:
    from dual_attention.training import build_optimizer

    optimizer, scheduler = build_optimizer(model, preset("cpu-small"))
    loss = sum(p.float().pow(2).sum() for p in model.parameters())
    loss.backward()
    optimizer.step()  # Adam now holds exp_avg / exp_avg_sq / step tensors
    scheduler.step()
    return optimizer, scheduler


def test_train_state_round_trips_under_weights_only_and_a_poisoned_one_is_refused(tmp_path: Path) -> None:
    from dual_attention.training import TRAIN_STATE_FILE, load_train_state

    model, folder = _small_checkpoint(tmp_path / "ckpt")
    optimizer, scheduler = _optimizer_after_a_step(model)
    # written the way dual_attention.training.save_training_checkpoint writes it
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": 4},
               folder / TRAIN_STATE_FILE)

    fresh = DualAttentionModel(preset("cpu-small"))
    from dual_attention.training import build_optimizer

    fresh_optimizer, fresh_scheduler = build_optimizer(fresh, preset("cpu-small"))
    assert load_train_state(folder, fresh, fresh_optimizer, fresh_scheduler) == 4
    restored, saved = fresh_optimizer.state_dict(), optimizer.state_dict()
    assert restored["param_groups"] == saved["param_groups"]
    assert restored["state"].keys() == saved["state"].keys() and len(saved["state"]) > 0
    for key, state in saved["state"].items():
        for name, value in state.items():
            assert torch.equal(restored["state"][key][name], value), (key, name)
    assert fresh_scheduler.state_dict() == scheduler.state_dict()

    marker = tmp_path / "marker"
    _poison_file(folder / TRAIN_STATE_FILE, marker, payload_key="optimizer")
    with pytest.raises(CheckpointError, match=r"ckpt/train_state\.pt: not a readable training state"):
        load_train_state(folder, fresh, fresh_optimizer, fresh_scheduler)
    assert not marker.exists()


def test_ray_train_checkpoint_restore_refuses_a_poisoned_train_state(tmp_path: Path) -> None:
    """Tune trials and restarted Train workers resume through ``ray.train.get_checkpoint()`` ->
    ``Checkpoint.as_directory()`` -> ``load_train_state``: the same refusal through Ray's checkpoint."""
    from ray.train import Checkpoint

    from dual_attention.training import TRAIN_STATE_FILE, load_train_state

    model, folder = _small_checkpoint(tmp_path / "epoch_4")
    marker = tmp_path / "marker"
    _poison_file(folder / TRAIN_STATE_FILE, marker, payload_key="optimizer")
    from dual_attention.training import build_optimizer

    optimizer, scheduler = build_optimizer(model, preset("cpu-small"))
    with Checkpoint.from_directory(str(folder)).as_directory() as directory, \
            pytest.raises(CheckpointError, match=r"train_state\.pt"):
        load_train_state(Path(directory), model, optimizer, scheduler)
    assert not marker.exists()


def test_registered_model_with_poisoned_artifacts_is_refused_by_serve_and_score(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The registry path serve and ``jobs.score`` load through (``jobs.runtime.tracking.load_registered_model``)
    reads only ``model.pt`` with ``weights_only``; the pyfunc's cloudpickled ``python_model.pkl`` is never
    unpickled. Both are poisoned in the artifact store here."""
    import mlflow
    from mlflow import MlflowClient

    from jobs import score
    from jobs.runtime.tracking import register_model, sqlite_uri
    from serve.model_source import ModelLoadError, load_model, pin_model_uri

    monkeypatch.chdir(tmp_path)  # mlflow's default artifact root (./mlruns) lands in tmp_path
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking_uri = sqlite_uri(tmp_path / "mlflow.db")
    _, folder = _small_checkpoint(tmp_path / "ckpt")
    previous, previous_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(tracking_uri)
    # the registry too: a training run earlier in the session (jobs.runtime.tracking.setup_mlflow) leaves the
    # process's registry URI on its own store, where the model would otherwise be registered
    mlflow.set_registry_uri(tracking_uri)
    try:
        mlflow.set_experiment("load-safety")
        with mlflow.start_run():
            registered = register_model(folder, CLASS_NAMES["her2"], "poisoned", alias="champion")
    finally:
        mlflow.set_tracking_uri(previous)
        mlflow.set_registry_uri(previous_registry)
        os.environ.pop("MLFLOW_TRACKING_URI", None)

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    download_uri = client.get_model_version_download_uri("poisoned", registered.version)
    stored = Path(download_uri.removeprefix("file://"))
    assert stored.is_dir(), download_uri  # a local artifact store: the files can be replaced in place
    marker = tmp_path / "marker"
    poisoned = [_poison_file(path, marker) for path in stored.rglob(CHECKPOINT_FILE)]
    pickles = list(stored.rglob("python_model.pkl"))
    assert poisoned and pickles
    for path in pickles:
        path.write_bytes(pickle.dumps(_Poison(marker)))

    ref = pin_model_uri(registered.model_uri, tracking_uri)
    with pytest.raises(ModelLoadError) as refused:
        load_model(ref, tracking_uri)
    message = str(refused.value)
    assert "model.pt" in message and "not a readable checkpoint" in message
    assert "poisoned" in message and "version 1" in message  # the model's name and version...
    assert str(tmp_path) not in message  # ...never the download folder (answers carry this text)

    assert score.main(["--model", registered.model_uri, "--mlflow-uri", tracking_uri,
                       "--slide", str(tmp_path / "unused.tiff")]) == 2
    assert "model.pt: not a readable checkpoint" in capsys.readouterr().err
    assert not marker.exists()


def test_sliding_window_model_with_a_poisoned_pickle_is_refused(tmp_path: Path) -> None:
    from jobs.baselines import load_sliding_window_model

    marker = tmp_path / "marker"
    path = _poison_file(tmp_path / "sliding_window.pt", marker)
    with pytest.raises(CheckpointError, match=r"sliding_window\.pt: not a readable sliding-window model"):
        load_sliding_window_model(path)
    assert not marker.exists()


def test_poisoned_preprocess_cache_entry_is_recomputed_not_unpickled(tmp_path: Path) -> None:
    """The thumbnail cache is ``.npz``: ``np.load`` without ``allow_pickle`` refuses object arrays, and
    an unreadable entry is recomputed from the slide."""
    import numpy as np

    from dual_attention.synthetic import write_synthetic_slide
    from jobs.preprocess import ThumbnailParams, cache_file_for, thumbnail_entry

    slide = tmp_path / "slide.tiff"
    write_synthetic_slide(slide, "her2", label=1, seed=2, width_level0_px=512, height_level0_px=512)
    params = ThumbnailParams(32, 4)
    cache = cache_file_for(slide, params, tmp_path / "cache")
    cache.parent.mkdir(parents=True)
    marker = tmp_path / "marker"
    with cache.open("wb") as handle:
        np.savez(handle, thumbnail=np.array([_Poison(marker)], dtype=object),
                 tissue_mask=np.zeros((16, 16), bool), level0_dims=np.array([512, 512]))
    with np.load(cache, allow_pickle=True) as live:  # the poison is live for a loader that allows pickles
        live["thumbnail"]
    assert marker.exists()
    marker.unlink()
    entry = thumbnail_entry(slide, params, tmp_path / "cache")
    assert not entry.from_cache and entry.thumbnail is not None and entry.thumbnail.shape == (16, 16, 3)
    assert not marker.exists()
