"""Tests of `dual-attention tune`: the search space's checks, and searches over the real training job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dual_attention.config import ConfigError, preset
from tune.space import NOISE_WIDTH, SearchSpaceError, load_space, space_from_dict

# -- the search space (no Ray) ------------------------------------------------------------------------------


@pytest.mark.parametrize("preset_name", ["paper-her2", "paper-mmr", "cpu-small"])
def test_default_space_is_centred_on_the_presets_values(preset_name: str) -> None:
    base = preset(preset_name)
    space = load_space(None, base)
    centre = space.centre()
    assert centre["loss.alpha"] == base.loss.alpha
    assert centre["loss.delta"] == base.loss.delta
    assert centre["sampler.noise_low"] == base.sampler.noise_low
    assert centre["sampler.noise_low"] + centre[NOISE_WIDTH] == base.sampler.noise_high
    assert space.centre_inside()
    assert space.trial_config(centre).to_dict() == base.to_dict()


def test_noise_high_is_above_low_by_construction() -> None:
    space = load_space(None, preset("cpu-small"))
    low_dim, width_dim = space.dimension("sampler.noise_low"), space.dimension(NOISE_WIDTH)
    for low in (low_dim.low, low_dim.high):
        for width in (width_dim.low, width_dim.high):
            config = space.trial_config({**space.centre(), "sampler.noise_low": low, NOISE_WIDTH: width})
            assert config.sampler.noise_high == pytest.approx(low + width)
            assert config.sampler.noise_high > config.sampler.noise_low


def test_searched_n_tiles_brings_candidates_along() -> None:
    space = space_from_dict({"sampler.n_tiles": {"sample": "choice", "values": [2, 6]}}, preset("cpu-small"))
    config = space.trial_config({"sampler.n_tiles": 6})
    assert (config.sampler.n_tiles, config.sampler.n_candidates) == (6, 12)


@pytest.mark.parametrize(
    ("entries", "named"),
    [
        ({"loss.alpha": {"sample": "uniform", "low": 0.5, "high": 1.2}}, "loss.alpha"),
        ({"loss.alpha": {"sample": "uniform", "low": 0.0, "high": 0.9}}, "loss.alpha"),
        ({"loss.alpha": {"sample": "uniform", "low": 0.6, "high": 0.6}}, "loss.alpha"),
        ({"loss.delta": {"sample": "loguniform", "low": 2.0, "high": 1.0}}, "loss.delta"),
        ({"loss.delta": {"sample": "uniform", "low": -1.0, "high": 1.0}}, "loss.delta"),
        ({"train.lr_sam": {"sample": "loguniform", "low": 0.0, "high": 0.1}}, "train.lr_sam"),
        ({"sampler.noise_width": {"sample": "uniform", "low": 0.0, "high": 1.0}}, "sampler.noise_width"),
        (
            {
                "sampler.noise_low": {"sample": "uniform", "low": -1.0, "high": 0.5},
                "sampler.noise_high": {"sample": "uniform", "low": 0.2, "high": 1.0},
            },
            "sampler.noise_high",
        ),
        ({"sampler.noise_low": {"sample": "uniform", "low": 0.0, "high": 1.5}}, "sampler.noise_low"),
        ({"agent.n_glimpses": {"sample": "int", "low": 0, "high": 4}}, "agent.n_glimpses"),
        ({"agent.n_glimpses": {"sample": "int", "low": 1.5, "high": 4}}, "agent.n_glimpses"),
        ({"loss.gamma": {"sample": "uniform", "low": 0.1, "high": 0.2}}, "loss.gamma"),
        ({"loss.alpha": {"sample": "normal", "low": 0.1, "high": 0.2}}, "loss.alpha"),
        ({"sampler.n_tiles": {"sample": "choice", "values": []}}, "sampler.n_tiles"),
    ],
)
def test_invalid_space_is_refused_naming_the_field(entries: dict, named: str, tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(entries))
    with pytest.raises(SearchSpaceError, match=named.replace(".", r"\.")) as caught:
        load_space(path, preset("cpu-small"))
    assert str(path) in str(caught.value)
    assert isinstance(caught.value, ConfigError)


def _noop_trainable(config: dict) -> None:
    """Stands in for the training job where only the searcher's suggestions are looked at."""


@pytest.mark.parametrize("searcher", ["random", "optuna"])
def test_searchers_start_at_the_centre_and_sample_inside_the_space(searcher: str) -> None:
    from ray.tune.search import Searcher

    from tune.search import SearchSettings, _searcher

    base = preset("cpu-small")
    space = load_space(None, base)
    settings = SearchSettings(manifest="unused", base_config=base.to_dict(), space={}, space_source="default",
                              storage_path="unused", name="unused", searcher=searcher, seed=0)
    algorithm = _searcher(settings, space, max_concurrent=2)
    if searcher == "optuna":
        assert isinstance(algorithm, Searcher)
        assert algorithm.set_search_properties("val_agreement_points_per_case", "max", space.to_tune())
        suggestions = [algorithm.suggest(f"t{i}") for i in range(4)]
    else:
        algorithm.add_configurations({"search": {"run": _noop_trainable, "config": space.to_tune(), "num_samples": 4}})
        trials = [algorithm.next_trial() for _ in range(2)]
        assert algorithm.next_trial() is None  # its own max_concurrent holds a third back (Tune's is ignored)
        for trial in trials:
            algorithm.on_trial_complete(trial.trial_id)
        trials += [algorithm.next_trial() for _ in range(2)]
        suggestions = [trial.config for trial in trials]
    assert suggestions[0] == space.centre()
    for sampled in suggestions[1:]:
        assert set(sampled) == set(space.names)
        for dim in space.dimensions:
            assert dim.contains(sampled[dim.name]), (dim.name, sampled[dim.name])
        config = space.trial_config(sampled)
        assert config.sampler.noise_high > config.sampler.noise_low


def test_trainables_register_from_several_threads(ray_cluster: None) -> None:
    """Issue 14.7: with Ray up, Tune's registry iterated a dict another thread was adding to
    (``RuntimeError: dictionary changed size during iteration`` in ``add_configurations``; cause in
    tune/ray_registry.py). A second thread registers trainables while this one builds searchers; a
    1 µs thread switch interval makes the interleaving that broke it happen within the first rounds."""
    import sys
    import threading

    from ray.tune.registry import TRAINABLE_CLASS, _global_registry, register_trainable

    from tune.search import SearchSettings, _searcher

    base = preset("cpu-small")
    space = load_space(None, base)
    settings = SearchSettings(manifest="unused", base_config=base.to_dict(), space={}, space_source="default",
                              storage_path="unused", name="unused", searcher="random", seed=0)
    errors: list[BaseException] = []
    stop = threading.Event()

    def register_elsewhere() -> None:
        try:
            for i in range(100_000):
                if stop.is_set():
                    return
                register_trainable(f"other-thread-{i % 16}", _noop_trainable, warn=False)
        except BaseException as error:  # reported by the assert below
            errors.append(error)

    other = threading.Thread(target=register_elsewhere, daemon=True)
    previous_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        other.start()
        for round_ in range(40):
            algorithm = _searcher(settings, space, max_concurrent=2)
            algorithm.add_configurations({f"search-{round_}": {"run": _noop_trainable, "config": space.to_tune(),
                                                              "num_samples": 1}})
    finally:
        stop.set()
        other.join(timeout=30)
        sys.setswitchinterval(previous_interval)
    assert not errors, errors
    assert not other.is_alive()
    assert _global_registry.contains(TRAINABLE_CLASS, "other-thread-0")
    assert not _global_registry._to_flush  # every registration reached the GCS


def test_best_trial_must_beat_the_centre_strictly() -> None:
    from tune.results import TrialRow, best_row

    def row(trial_id: str, metric: float, is_centre: bool = False) -> TrialRow:
        return TrialRow(trial_id, "TERMINATED", {}, 2, False, metric, metric, 1, None, is_centre, 1.0)

    tied = [row("a", 0.5), row("centre", 0.5, is_centre=True), row("c", 0.25)]
    assert best_row(tied, "max").trial_id == "centre"
    assert best_row(tied, "min").trial_id == "c"
    assert best_row([row("a", 0.75), row("centre", 0.5, is_centre=True)], "max").trial_id == "a"
    assert best_row([row("a", float("nan"))], "max") is None


def test_unreadable_space_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SearchSpaceError, match="missing.yaml"):
        load_space(tmp_path / "missing.yaml", preset("cpu-small"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("loss.alpha: [unclosed\n")
    with pytest.raises(SearchSpaceError, match="broken.yaml"):
        load_space(broken, preset("cpu-small"))


# -- searches over the real training job (Ray) ---------------------------------------------------------------

EPOCHS = 2
# The test search ranks trials by the training loss L_J (mode min), not by the validation metric that
# `dual-attention tune` uses by default: after one training step per epoch the validation metrics of four
# slides are noise (trials differ by less than repeated runs of one trial do), so whether ASHA stops a
# trial would be a coin toss. L_J = L_HA + alpha**epoch * L_SA with L_HA = L_theta + delta * (L_bb + L_s)
# grows with delta, which the search varies over 0.1-10: with the searcher's seed 0 the last two trials
# (delta 6.7 and 7.4, L_J about 8 and 9 against -3 and -5 for the first two) trail at the first rung
# whatever order the first two reach it in.
METRIC, MODE = "train_l_j", "min"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight small synthetic HER2 slides in two folds (each fold holds every class)."""
    from dual_attention.synthetic import write_cohort

    return write_cohort(tmp_path_factory.mktemp("tune-cohort"), "her2", 8, seed=3, slide_level0_px=2048,
                        n_folds=2, progress=False)


def search_args(manifest: Path, storage: Path, name: str, num_samples: int, max_concurrent: int = 1) -> list[str]:
    """A tiny search: one Train worker per trial, one step per epoch; thumbnails and masks cached beside
    the cohort, shared by the tests."""
    return ["--manifest", str(manifest), "--preset", "cpu-small", "--epochs", str(EPOCHS), "--num-workers", "1",
            "--set", "train.steps_per_epoch=1", "--num-samples", str(num_samples),
            "--max-concurrent", str(max_concurrent),
            "--storage-path", str(storage), "--name", name, "--train-poll-s", "0.2", "--seed", "0",
            "--device", "cpu", "--cache-dir", str(manifest.parent / "cache")]


def _mlflow_client(experiment_dir: Path):  # noqa: ANN202
    from mlflow import MlflowClient

    uri = f"sqlite:///{experiment_dir / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def _children(client, parent_run_id: str) -> list:  # noqa: ANN001
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiment_ids, filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def _default_mlflow_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """The search's default store (sqlite in its folder): mlflow.set_tracking_uri in an earlier test of
    this process leaves $MLFLOW_TRACKING_URI set, which a search would take as the user's choice."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _free_cpus_settle(expected: float, timeout_s: float = 30.0) -> float:
    import ray

    deadline = time.monotonic() + timeout_s
    free = ray.available_resources().get("CPU", 0.0)
    while free < expected - 1e-6 and time.monotonic() < deadline:
        time.sleep(0.5)
        free = ray.available_resources().get("CPU", 0.0)
    return free


@pytest.mark.slow
def test_four_trial_search_stops_early_registers_best_and_logs_parent_and_children(
    ray_cluster: None, cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import matplotlib.image
    import pyarrow.parquet as pq
    import ray

    from jobs.runtime.tracking import load_registered_model
    from tune.search import main

    _default_mlflow_store(monkeypatch)
    free_before = ray.available_resources().get("CPU", 0.0)
    started = time.perf_counter()
    args = search_args(cohort, tmp_path, "search", num_samples=4, max_concurrent=2)
    assert main(args + ["--metric", METRIC, "--mode", MODE]) == 0
    wall = time.perf_counter() - started
    experiment_dir = tmp_path / "search"
    report = json.loads((experiment_dir / "results" / "report.json").read_text())
    print(f"\n4-trial search wall time: {wall:.1f}s; report: {json.dumps(report, default=str)[:1500]}")

    table = pq.read_table(experiment_dir / "results" / "trials.parquet").to_pylist()
    assert len(table) == 4 and all(row["status"] == "TERMINATED" for row in table)
    assert sum(row["is_centre"] for row in table) == 1  # the preset's own values were evaluated
    centre = next(row for row in table if row["is_centre"])
    assert (centre["loss.alpha"], centre["loss.delta"], centre["sampler.noise_low"], centre["sampler.noise_high"]) \
        == (0.5, 1.0, 0.0, 1.0)
    assert all(row["sampler.noise_high"] > row["sampler.noise_low"] for row in table)
    # ASHA cut at least one trial short; at least one ran every epoch
    assert any(row["stopped_early"] and row["epochs_done"] < EPOCHS for row in table)
    assert any(row["epochs_done"] == EPOCHS for row in table)
    assert report["stopped_early"] == sum(row["stopped_early"] for row in table)
    assert (experiment_dir / "results" / "trials.csv").read_text().count("\n") == 5

    # the best trial is the one with the best metric at any epoch, and it was reported and registered
    best = min(table, key=lambda row: row[f"{METRIC}_best"])
    assert report["best"]["trial_id"] == best["trial_id"]
    assert report["best"]["metric_best"] == pytest.approx(best[f"{METRIC}_best"])
    client, uri = _mlflow_client(experiment_dir)
    model, config, meta = load_registered_model("models:/dual-attention-her2@best-search", tracking_uri=uri)
    assert meta["alias"] == "best-search" and report["registered"]["version"] == meta["version"]
    assert config.loss.alpha == pytest.approx(best["loss.alpha"])
    assert config.loss.delta == pytest.approx(best["loss.delta"])
    assert config.sampler.noise_high == pytest.approx(best["sampler.noise_high"])
    assert Path(best["best_checkpoint"]).name == f"checkpoint_epoch_{best['best_epoch']:03d}"

    # MLflow: one parent run for the search, one child per trial with its epochs
    parent = client.get_run(report["mlflow"]["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["search"] == "true"
    assert parent.data.tags["best_trial_id"] == best["trial_id"]
    assert parent.data.metrics[f"best_{METRIC}"] == pytest.approx(best[f"{METRIC}_best"])
    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"trials.parquet", "trials.csv", "metric_vs_params.png", "space.yaml"} <= artifacts
    children = _children(client, parent.info.run_id)
    assert sorted(c.data.tags["tune_trial_id"] for c in children) == sorted(row["trial_id"] for row in table)
    for child in children:
        row = next(r for r in table if r["trial_id"] == child.data.tags["tune_trial_id"])
        assert child.info.status == "FINISHED"
        assert child.data.tags["stopped_early"] == str(row["stopped_early"]).lower()
        assert float(child.data.params["loss.alpha"]) == pytest.approx(row["loss.alpha"])
        steps = [m.step for m in client.get_metric_history(child.info.run_id, METRIC)]
        assert sorted(steps) == list(range(row["epochs_done"]))
    registered_in = client.get_run(parent.data.tags["best_child_run_id"])
    assert registered_in.data.tags["tune_trial_id"] == best["trial_id"]

    image = matplotlib.image.imread(experiment_dir / "results" / "metric_vs_params.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 300

    # stopped trials gave back their Train workers' placement groups
    assert _free_cpus_settle(free_before) == pytest.approx(free_before)


def _tune_statuses(experiment_dir: Path) -> dict[str, str]:
    """Trial id -> status in the experiment state Tune last saved (what a resumed search starts from)."""
    states = sorted(experiment_dir.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
    except (OSError, json.JSONDecodeError):  # being rewritten
        return {}
    trials = [json.loads(entry[0]) for entry in data["trial_data"]]
    return {trial["trial_id"]: trial["status"] for trial in trials}


@pytest.mark.slow
def test_a_killed_search_resumes_without_rerunning_its_finished_trial(
    ray_cluster: None, cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    from tune.search import main

    _default_mlflow_store(monkeypatch)
    experiment_dir = tmp_path / "resumable"
    # The first run is a separate driver on the session's Ray instance; killing it ends its Ray job (its
    # trials, Train workers and placement groups go with it) and leaves the instance for the resume.
    runner = (
        "import sys, ray\n"
        "ray.init(address=sys.argv[1], log_to_driver=False)\n"
        "from tune.search import main\n"
        "sys.exit(main(sys.argv[2:]))\n"
    )
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
               TUNE_GLOBAL_CHECKPOINT_S="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    address = ray.get_runtime_context().gcs_address
    log = (tmp_path / "first-run.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-c", runner, address, *search_args(cohort, tmp_path, "resumable", num_samples=2)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "TERMINATED" not in _tune_statuses(experiment_dir).values():
            assert process.poll() is None, (tmp_path / "first-run.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial finished within 240 s"
            time.sleep(0.5)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log.close()
    statuses = _tune_statuses(experiment_dir)
    (finished,) = [trial_id for trial_id, status in statuses.items() if status == "TERMINATED"]
    finished_dir = experiment_dir / "trial_runs" / finished / "ray" / "fold0"
    checkpoints_before = {p.name: p.stat().st_mtime_ns for p in finished_dir.glob("checkpoint_epoch_*")}
    assert len(checkpoints_before) == EPOCHS
    client, _ = _mlflow_client(experiment_dir)
    parent_run_id = json.loads((experiment_dir / "search.json").read_text())["parent_run_id"]

    assert main(["--resume", str(experiment_dir)]) == 0

    report = json.loads((experiment_dir / "results" / "report.json").read_text())
    assert report["trials"] == 2 and report["errored"] == 0
    after = _tune_statuses(experiment_dir)
    # the trials of the killed run are kept (ids and all); the searcher went on to the second trial
    assert set(statuses) <= set(after) and len(after) == 2 and set(after.values()) == {"TERMINATED"}
    # the finished trial was not trained again: its checkpoints are the ones written before the kill
    assert {p.name: p.stat().st_mtime_ns for p in finished_dir.glob("checkpoint_epoch_*")} == checkpoints_before
    children = _children(client, parent_run_id)
    assert sorted(c.data.tags["tune_trial_id"] for c in children) == sorted(after)  # one child run per trial
    finished_child = next(c for c in children if c.data.tags["tune_trial_id"] == finished)
    steps = [m.step for m in client.get_metric_history(finished_child.info.run_id, "val_agreement_points_per_case")]
    assert sorted(steps) == list(range(EPOCHS))  # each epoch logged once
    assert report["mlflow"]["parent_run_id"] == parent_run_id
    assert client.get_run(parent_run_id).info.status == "FINISHED"


def test_invalid_space_is_refused_before_any_trial_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tune.search import main

    cohort = tmp_path / "manifest.parquet"
    cohort.write_bytes(b"")  # never read: the space is refused first

    space = tmp_path / "bad-space.yaml"
    space.write_text(yaml.safe_dump({"loss.alpha": {"sample": "uniform", "low": 0.2, "high": 1.5},
                                     "loss.delta": {"sample": "loguniform", "low": 0.1, "high": 10.0}}))
    code = main(search_args(cohort, tmp_path, "refused", num_samples=2) + ["--space", str(space)])
    assert code == 2
    assert "loss.alpha" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()  # nothing was written, no trial started

    space.write_text(yaml.safe_dump({"sampler.noise_low": {"sample": "uniform", "low": -1.0, "high": 0.5},
                                     "sampler.noise_high": {"sample": "uniform", "low": 0.25, "high": 1.0}}))
    assert main(search_args(cohort, tmp_path, "refused", num_samples=2) + ["--space", str(space)]) == 2
    assert "sampler.noise_high" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
