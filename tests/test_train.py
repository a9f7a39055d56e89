"""Training job: batch sampler and optimiser units, then one real 2-worker Ray Train run on a tiny synthetic
cohort with a broken slide (MLflow run, registered model, scoring from the checkpoint), and its resumption
with an injected worker failure."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dual_attention.checkpoint import load_checkpoint
from dual_attention.config import preset
from dual_attention.manifest import read_manifest, write_manifest
from dual_attention.models import DualAttentionModel
from dual_attention.training import build_optimizer, class_balanced_batches, steps_per_epoch
from jobs.train import main

# -- units ---------------------------------------------------------------------------------------------------


def test_every_batch_holds_every_class_and_classes_are_drawn_evenly() -> None:
    labels = [0, 0, 0, 0, 0, 1, 2, 2, 3, 3, 3]
    batches = class_balanced_batches(labels, 4, 5, 40, np.random.default_rng(7))
    assert len(batches) == 40
    for batch in batches:
        assert len(batch) == 5
        assert {labels[i] for i in batch} == {0, 1, 2, 3}
    # within a class every slide is drawn once before any is drawn twice: counts differ by at most one
    per_slide = Counter(i for batch in batches[:8] for i in batch)
    class2 = [per_slide[i] for i in (6, 7)]
    assert max(class2) - min(class2) <= 1
    # the same generator seed gives the same plan (every worker computes the same plan)
    assert batches == class_balanced_batches(labels, 4, 5, 40, np.random.default_rng(7))


def test_batch_sampler_refuses_impossible_plans_naming_the_cause() -> None:
    with pytest.raises(ValueError, match="train.slides_per_batch"):
        class_balanced_batches([0, 1, 2, 3], 4, 3, 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"class\(es\) \[2\]"):
        class_balanced_batches([0, 1, 3, 3], 4, 4, 1, np.random.default_rng(0))


def test_steps_per_epoch_covers_the_training_slides_once_across_workers() -> None:
    config = preset("cpu-small").with_overrides({"train.steps_per_epoch": 0})  # 4 slides per batch, one pass
    assert steps_per_epoch(config, 16, 2) == 2
    assert steps_per_epoch(config, 17, 2) == 3
    assert steps_per_epoch(config.with_overrides({"train.steps_per_epoch": 5}), 16, 2) == 5


def test_optimizer_has_the_sam_and_agent_learning_rates_over_all_parameters() -> None:
    config = preset("cpu-small").with_overrides({"train.lr_sam": 1e-4, "train.lr_agent": 3e-3})
    model = DualAttentionModel(config)
    optimizer, scheduler = build_optimizer(model, config)
    sam_group, agent_group = optimizer.param_groups
    assert (sam_group["lr"], agent_group["lr"]) == (1e-4, 3e-3)
    sam_ids = {id(p) for p in sam_group["params"]}
    agent_ids = {id(p) for p in agent_group["params"]}
    assert not sam_ids & agent_ids
    assert sam_ids | agent_ids == {id(p) for p in model.parameters()}
    assert {id(p) for p in model.agent.parameters()} <= agent_ids
    assert {id(p) for p in model.soft_attention.parameters()} <= sam_ids
    for _ in range(config.train.lr_step_size):
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * config.train.lr_gamma)


def test_resume_from_something_that_is_neither_a_run_nor_a_checkpoint_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["--resume", str(tmp_path)]) == 2
    assert "neither a run folder" in capsys.readouterr().err


def test_bad_input_is_refused_before_ray_starts_naming_the_field_or_file(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "missing.parquet"
    assert main(["--manifest", str(missing), "--run-dir", str(tmp_path / "run")]) == 2
    assert f"manifest {missing}: file not found" in capsys.readouterr().err
    assert main(["--manifest", str(missing), "--set", "loss.alpha=3"]) == 2
    assert "loss.alpha" in capsys.readouterr().err


def test_resume_from_a_finished_checkpoint_asks_for_more_epochs(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    from dual_attention.checkpoint import save_checkpoint

    config = preset("cpu-small")
    epochs = config.train.epochs
    save_checkpoint(tmp_path / "ckpt", DualAttentionModel(config), config, extra={"epoch": epochs - 1})
    assert main(["--resume", str(tmp_path / "ckpt"), "--manifest", str(tmp_path / "unused.parquet")]) == 2
    assert f"pass --epochs greater than {epochs}" in capsys.readouterr().err


def test_run_settings_and_the_config_are_frozen_and_bad_settings_are_refused_by_flag(tmp_path: Path) -> None:
    import dataclasses

    from dual_attention.config import ConfigError
    from jobs.train import TrainRun

    run = TrainRun(tmp_path / "run", val_folds=(0, 1), torch_threads=2)
    assert run.cache == tmp_path / "run" / "cache" and run.torch_threads == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.max_failures = 5  # type: ignore[misc]
    config = preset("cpu-small")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.epochs = 3  # type: ignore[misc]  # run_training cannot change its caller's config
    for bad, named in (({"torch_threads": 0}, "--torch-threads"), ({"tile_actors_per_worker": 0},
                       "--tile-actors-per-worker"), ({"device": "tpu"}, "device")):
        with pytest.raises(ConfigError, match=named):
            TrainRun(tmp_path, **bad)


def test_tile_reads_stay_in_cpu_workers_and_go_to_reader_actors_beside_gpu_workers(tmp_path: Path) -> None:
    from jobs.train import TrainRun, build_parser

    run = TrainRun(tmp_path, tile_actors_per_worker=3)
    assert run.tile_reader == build_parser().parse_args([]).tile_reader == "auto"
    assert run.reads_tiles_in_worker(use_gpu=False) and run.tile_actors(use_gpu=False) == 0
    assert not run.reads_tiles_in_worker(use_gpu=True) and run.tile_actors(use_gpu=True) == 3
    for use_gpu in (False, True):  # an explicit choice wins on either device
        assert TrainRun(tmp_path, tile_reader="local").reads_tiles_in_worker(use_gpu)
        assert TrainRun(tmp_path, tile_reader="pool", tile_actors_per_worker=2).tile_actors(use_gpu) == 2


def test_a_config_saved_with_the_removed_train_use_gpu_still_loads() -> None:
    """Checkpoints, run folders and registered models written before train.use_gpu was removed carry it."""
    from dual_attention.config import DualAttentionConfig

    config = preset("cpu-small")
    old = config.to_dict()
    assert "use_gpu" not in old["train"]
    old["train"]["use_gpu"] = True
    assert DualAttentionConfig.from_dict(old) == config


def test_train_and_tune_read_the_same_config_flags() -> None:
    from dual_attention.config import config_from_flags
    from jobs.train import build_parser as train_parser
    from tune.search import build_parser as tune_parser

    flags = ["--preset", "cpu-small", "--task", "mmr", "--epochs", "3", "--num-workers", "1", "--val-fold", "2",
             "--set", "loss.alpha=0.7"]
    trained = config_from_flags(train_parser().parse_args(flags))
    tuned_args = tune_parser().parse_args([*flags, "--mode", "min"])  # tune's --mode: the metric's direction
    assert config_from_flags(tuned_args) == trained and tuned_args.mode == "min"
    assert (trained.task, trained.train.epochs, trained.train.num_workers, trained.train.val_fold,
            trained.loss.alpha, trained.train.mode) == ("mmr", 3, 1, 2, 0.7, "joint")
    assert config_from_flags(train_parser().parse_args(["--mode", "separate"])).train.mode == "separate"


# -- a real run ------------------------------------------------------------------------------------------------

BROKEN_ID = "broken-slide"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight 2048² synthetic HER2 slides in two folds (every class in each), plus a row for a broken file."""
    from dual_attention.synthetic import write_cohort

    root = tmp_path_factory.mktemp("train-cohort")
    manifest = write_cohort(root, "her2", 8, seed=3, slide_level0_px=2048, n_folds=2, progress=False)
    broken = root / "slides" / "broken.svs"
    broken.write_bytes(b"this is not a slide\n" * 64)
    rows = read_manifest(manifest).to_pylist()
    rows.append(dict(rows[0], slide_id=BROKEN_ID, path=str(broken), label=3, fold=0))
    return write_manifest(rows, root / "manifest_with_broken.parquet")


def _mlflow_client(run_dir: Path):  # noqa: ANN202
    from mlflow import MlflowClient

    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


@pytest.fixture(scope="module")
def trained_run(ray_cluster: None, cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("train-run") / "run"
    # 2 steps per epoch: the test is about the job's plumbing (the learning has its own tests and benchmark)
    code = main(["--manifest", str(cohort), "--preset", "cpu-small", "--epochs", "2", "--num-workers", "2",
                 "--set", "train.steps_per_epoch=2", "--set", "train.sam_warmup_steps=0", "--val-fold", "1",
                 "--run-dir", str(run_dir),
                 # the reader actors (the GPU workers' default): a lost worker's readers die with it
                 "--device", "cpu", "--overlays-per-epoch", "1", "--tile-reader", "pool"])
    assert code == 0
    return run_dir


@pytest.mark.slow
def test_two_worker_run_logs_to_mlflow_registers_and_skips_the_broken_slide(trained_run: Path, cohort: Path) -> None:
    report = json.loads((trained_run / "report.json").read_text())
    assert [s["slide_id"] for s in report["slides_skipped"]] == [BROKEN_ID]
    assert "broken.svs" in report["slides_skipped"][0]["reason"]
    assert report["slides_used"] == 8
    (fold,) = report["folds"]
    assert fold["val_fold"] == 1 and fold["epochs_done"] == 2 and fold["error"] is None
    assert fold["final_metrics"]["val_n_slides"] == 4  # fold 1 of the 8 good slides

    client, uri = _mlflow_client(trained_run)
    run = client.get_run(fold["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["loss.alpha"] == "0.5" and run.data.params["train.num_workers"] == "2"
    assert run.data.params["config_digest"] == report["config_digest"]
    for name in ("train_l_j", "train_l_sa", "train_l_ha", "val_accuracy", "train_tile_wait_seconds",
                 "level0_pixels_read"):
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in history) == [0, 1], name
    assert all(m.value > 0 for m in client.get_metric_history(run.info.run_id, "level0_pixels_read"))
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "checkpoints/checkpoint_epoch_001")}
    assert "checkpoints/checkpoint_epoch_001/model.pt" in artifacts
    overlays = [f.path for f in client.list_artifacts(run.info.run_id, "overlays/epoch_001")]
    assert len(overlays) == 1 and overlays[0].endswith(".png")
    skipped = json.loads(Path(client.download_artifacts(run.info.run_id, "slides_skipped.json")).read_text())
    assert [s["slide_id"] for s in skipped["slides_skipped"]] == [BROKEN_ID]

    from jobs.runtime.tracking import load_registered_model, score_slide_file

    model, config, meta = load_registered_model("models:/dual-attention-her2@candidate", tracking_uri=uri)
    assert meta["name"] == "dual-attention-her2" and meta["alias"] == "candidate" and meta["version"] == "1"
    assert config.digest() == report["config_digest"]
    good = [r for r in read_manifest(cohort).to_pylist() if r["slide_id"] != BROKEN_ID]
    scored = score_slide_file(model, config, good[0]["path"], seed=0)
    probabilities = [scored[f"prob_{name}"] for name in config.class_names]
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
    assert scored["predicted_class"] == int(np.argmax(probabilities))

    # the checkpoint folder Ray Train kept loads the same weights
    checkpoint_model, _, extra = load_checkpoint(fold["checkpoint"])
    assert extra["epoch"] == 1
    for (name, a), b in zip(checkpoint_model.state_dict().items(), model.state_dict().values(), strict=True):
        assert np.array_equal(a.numpy(), b.numpy()), name


@pytest.mark.slow
def test_resume_continues_at_the_next_epoch_and_survives_a_lost_worker(trained_run: Path) -> None:
    ray_dir = trained_run / "ray" / "fold1"
    first = {p.parent.name: p.stat().st_mtime_ns for p in ray_dir.glob("checkpoint_epoch_*/model.pt")}
    assert sorted(first) == ["checkpoint_epoch_000", "checkpoint_epoch_001"]

    # one more epoch; a worker dies at its start, so Ray Train restarts the group from the epoch-1 checkpoint
    code = main(["--resume", str(trained_run), "--epochs", "3", "--inject-failure-at-epoch", "2"])
    assert code == 0
    assert (trained_run / "failed_once_fold1").is_file()  # the failure really happened
    after = {p.parent.name: p.stat().st_mtime_ns for p in ray_dir.glob("checkpoint_epoch_*/model.pt")}
    assert sorted(after) == ["checkpoint_epoch_000", "checkpoint_epoch_001", "checkpoint_epoch_002"]
    assert {k: after[k] for k in first} == first  # epochs 0 and 1 were not trained again
    _, _, extra = load_checkpoint(ray_dir / "checkpoint_epoch_002")
    assert extra["epoch"] == 2

    report = json.loads((trained_run / "report.json").read_text())
    (fold,) = report["folds"]
    assert fold["epochs_done"] == 3
    client, _ = _mlflow_client(trained_run)
    history = client.get_metric_history(fold["mlflow_run_id"], "train_l_j")  # the same MLflow run, extended
    assert sorted(m.step for m in history) == [0, 1, 2]
    versions = client.search_model_versions("name='dual-attention-her2'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert str(client.get_model_version_by_alias("dual-attention-her2", "candidate").version) == "2"


@pytest.mark.slow
def test_a_run_whose_worker_keeps_failing_ends_failed_with_its_cause_and_resumes_in_the_same_mlflow_run(
    ray_cluster: None, cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = (tmp_path / "run").resolve()
    small = ["--set", "train.steps_per_epoch=1", "--set", "train.sam_warmup_steps=0", "--overlays-per-epoch", "0",
             "--tile-reader", "local", "--no-register"]
    # the worker fails at epoch 1 on every attempt: one restart (from the epoch-0 checkpoint), then give up
    code = main(["--manifest", str(cohort), "--preset", "cpu-small", "--epochs", "2", "--num-workers", "1",
                 "--val-fold", "1", "--run-dir", str(run_dir), "--device", "cpu", "--max-failures", "1",
                 "--inject-persistent-failure-at-epoch", "1", *small])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback (most recent call last)" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "training fold 1 failed after 1 worker-group restart(s) (--max-failures 1)" in line
    assert "injected persistent worker failure at epoch 1" in line
    assert line.endswith(f"continue with: python -m jobs.train --resume {run_dir}")

    state = json.loads((run_dir / "state.json").read_text())
    run_id = state["folds"]["1"]["mlflow_run_id"]
    assert state["folds"]["1"]["last_logged_epoch"] == 0
    client, _ = _mlflow_client(run_dir)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert "injected persistent worker failure at epoch 1" in run.data.tags["error"]
    # epoch 0 reached MLflow as it ended, although the fit never returned a result
    assert [m.step for m in client.get_metric_history(run_id, "train_l_j")] == [0]
    assert "checkpoints/checkpoint_epoch_000/model.pt" in {
        f.path for f in client.list_artifacts(run_id, "checkpoints/checkpoint_epoch_000")}
    assert "error.txt" in {f.path for f in client.list_artifacts(run_id)}

    # What a killed driver leaves: the MLflow run still RUNNING. Resuming continues that run.
    client.update_run(run_id, status="RUNNING")
    assert main(["--resume", str(run_dir), *small[-1:]]) == 0
    assert "continuing MLflow run" in capsys.readouterr().out
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "train_l_j")) == [0, 1]  # none lost, none twice
    runs = client.search_runs([run.info.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # one MLflow run for the whole training
    report = json.loads((run_dir / "report.json").read_text())
    assert report["folds"][0]["epochs_done"] == 2 and report["folds"][0]["mlflow_run_id"] == run_id


def test_failure_cause_names_the_failed_workers_exception_in_one_line() -> None:
    from jobs.train import failure_cause

    class WorkerGroupError(Exception):
        def __init__(self, failures: dict[int, Exception]) -> None:
            super().__init__("Training failed due to worker errors:\n...")
            self.worker_failures = failures

    traceback_text = "Traceback (most recent call last):\n  File \"x.py\", line 1\nRuntimeError: disk full"
    error = WorkerGroupError({1: RuntimeError(traceback_text), 0: ValueError("bad\nValueError: no tiles")})
    assert failure_cause(error) == "worker 0: ValueError: no tiles (and 1 more worker(s))"
    assert failure_cause(OSError("gone")) == "OSError: gone"
