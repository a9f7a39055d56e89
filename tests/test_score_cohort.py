"""Cohort scoring as a Ray Data job: a tiny synthetic cohort plus a broken slide, scored, then resumed."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from shapely.geometry import shape

from dual_attention.annotations import slide_score_geojson
from dual_attention.checkpoint import load_checkpoint, save_checkpoint
from dual_attention.config import preset
from dual_attention.manifest import ManifestError, ManifestRow, manifest_rows, write_manifest
from dual_attention.models import DualAttentionModel
from dual_attention.pipeline import slide_seed
from jobs.score import score_slide_path
from jobs.score_cohort import (
    AgentStage,
    ProposeStage,
    StageSettings,
    geojson_path,
    main,
    read_scores,
    read_tiles_stage,
    slides_in_folder,
    slides_in_manifest,
)

SEED = 7


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory, shared_slides: Path) -> Path:
    """Three 1024² synthetic HER2 slides and a copy of the unreadable Aperio file; returns the manifest."""
    from dual_attention.synthetic import write_cohort

    root = tmp_path_factory.mktemp("cohort")
    manifest = write_cohort(root, "her2", n_slides=3, seed=3, slide_level0_px=1024, n_folds=1, workers=1,
                            progress=False)
    broken = root / "slides" / "broken.svs"
    shutil.copyfile(shared_slides / "broken" / "unreadable.svs", broken)
    rows = manifest_rows(manifest) + [ManifestRow("broken", str(broken), 0, "her2", fold=0, seed=0)]
    return write_manifest(rows, root / "manifest-with-broken.parquet")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = preset("cpu-small").with_overrides({"sampler.n_tiles": 2, "sampler.n_candidates": 4})
    return save_checkpoint(tmp_path_factory.mktemp("ckpt"), DualAttentionModel(config), config).parent


def test_cohort_scores_match_in_process_scoring_and_a_rerun_resumes(
    ray_cluster: None, cohort: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "scores"
    args = ["--model", str(checkpoint), "--manifest", str(cohort), "--out", str(out), "--seed", str(SEED), "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "4/4 slides: 3 scored, 1 failed" in printed.out and "slides/h" in printed.out
    assert "failed broken: SlideError" in printed.err

    rows = {r["slide_id"]: r for r in read_scores(out)}
    good = {r.slide_id: r for r in manifest_rows(cohort) if r.slide_id != "broken"}
    assert sorted(rows) == sorted([*good, "broken"])
    broken = rows.pop("broken")
    assert broken["status"] == "error" and broken["predicted_class"] is None and broken["prob_0"] is None
    assert broken["confidence"] is None and broken["read_s"] is None and broken["thumbnail_s"] is None
    assert broken["error"].startswith("SlideError: ") and "broken.svs" in broken["error"]

    model, config, _ = load_checkpoint(checkpoint)
    names = config.class_names
    tiles = pq.read_table(out / "tiles").to_pylist()
    for slide_id, row in rows.items():
        expected, _, _ = score_slide_path(model, config, good[slide_id].path, slide_seed(SEED, slide_id))
        assert row["status"] == "ok" and row["error"] is None
        assert row["label"] == good[slide_id].label
        assert row["predicted_class"] == expected.predicted_class
        assert row["predicted_label"] == expected.predicted_label
        assert [row[f"prob_{n}"] for n in names] == pytest.approx(expected.class_probabilities, abs=1e-6)
        assert row["confidence"] == pytest.approx(expected.confidence, abs=1e-6)
        assert row["fraction_level0_read"] == pytest.approx(expected.fraction_level0_read)
        assert row["model_name"] == str(checkpoint.resolve()) and row["sampler"] == "attention"
        assert row["wall_time_s"] >= row["agent_s"] > 0 and row["read_s"] > 0 and row["propose_s"] > 0
        mine = sorted((t for t in tiles if t["slide_id"] == slide_id), key=lambda t: t["tile_index"])
        assert [(t["x0"], t["y0"], t["width"], t["height"]) for t in mine] == [
            s.level0_box.as_tuple() for s in expected.tiles]
        for tile, want in zip(mine, expected.tiles, strict=True):
            assert tile["predicted_class"] == want.predicted_class
            assert tile["glimpse_x_level0_px"] == pytest.approx([x for x, _ in want.glimpse_trail_level0])
            assert tile["glimpse_y_level0_px"] == pytest.approx([y for _, y in want.glimpse_trail_level0])
        # The slide's GeoJSON: its tiles are the tiles table's boxes, its tissue outline is there.
        features = json.loads(geojson_path(out, slide_id).read_text())["features"]
        assert [shape(f["geometry"]).bounds for f in features if f["properties"]["kind"] == "tile"] == [
            (t["x0"], t["y0"], t["x0"] + t["width"], t["y0"] + t["height"]) for t in mine]
        assert [f["properties"]["kind"] for f in features].count("tissue") == 1
    assert not geojson_path(out, "broken").exists()

    parts = sorted(p.name for p in (out / "slides").glob("*.parquet"))
    assert len(parts) >= 2  # written as slides finished, not in one piece at the end

    assert main(args) == 0  # the same --out again: nothing left to score
    assert "nothing to score: 4 slides already in" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "slides").glob("*.parquet")) == parts

    # Only the failed slide is scored again (exit 1: every slide of that run failed); its newest row counts.
    assert main([*args, "--retry-errors"]) == 1
    assert "1/1 slides: 0 scored, 1 failed" in capsys.readouterr().out
    again = {r["slide_id"]: r for r in read_scores(out)}
    assert sorted(again) == sorted([*good, "broken"]) and again["broken"]["run"] == 2
    assert all(again[s]["run"] == 1 for s in good)

    other = [*args[:-3], "--sampler", "random", "--quiet"]  # another job must not mix into this --out
    assert main(other) == 2
    assert "use another --out" in capsys.readouterr().err


def test_inputs_folder_and_manifest_errors(cohort: Path, tmp_path: Path) -> None:
    folder_rows = slides_in_folder(cohort.parent / "slides")
    assert sorted(r["slide_id"] for r in folder_rows) == sorted(r.slide_id for r in manifest_rows(cohort))
    assert all(r["label"] == -1 for r in folder_rows)  # a folder carries no labels

    with pytest.raises(FileNotFoundError, match="no slide files"):
        slides_in_folder(tmp_path)
    (tmp_path / "a.svs").touch()
    (tmp_path / "a.tiff").touch()
    with pytest.raises(ValueError, match=r"a\.svs and .*a\.tiff are both slide 'a'"):
        slides_in_folder(tmp_path)
    with pytest.raises(ManifestError, match="another task than the model's 'mmr'"):
        slides_in_manifest(cohort, "mmr")
    # Only slide_id and path are needed; a manifest's own folder resolves its relative paths.
    table = pq.read_table(cohort)
    unlabelled = cohort.parent / "unlabelled.parquet"
    pq.write_table(table.select(["slide_id", "path"]), unlabelled)
    assert [(r["path"], r["label"]) for r in slides_in_manifest(unlabelled, "her2")] == [
        (r.path, -1) for r in manifest_rows(cohort)]
    pq.write_table(table.select(["slide_id"]), tmp_path / "no-path.parquet")
    with pytest.raises(ManifestError, match="no-path.parquet: missing required column 'path'"):
        slides_in_manifest(tmp_path / "no-path.parquet", "her2")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the agent stage's GPU path is not run")
def test_the_agent_stage_on_a_gpu_scores_as_in_process_cpu_scoring(cohort: Path, checkpoint: Path) -> None:
    """The stages run as plain objects (no Ray): a GPU agent actor's scores equal the CPU pipeline's to
    float tolerance (GPU kernels differ in the last bits), with the same tiles and classes."""
    model, config, _ = load_checkpoint(checkpoint)
    settings = StageSettings(config=config, sampler="attention", seed=SEED)
    propose = ProposeStage(load_checkpoint(checkpoint)[0], settings)
    agent = AgentStage(load_checkpoint(checkpoint)[0], settings, "ckpt", None)
    assert next(agent.model.parameters()).is_cuda
    for row in slides_in_manifest(cohort, "her2"):
        out = agent(read_tiles_stage(propose(row)))
        if row["slide_id"] == "broken":
            assert out["status"] == "error"
            continue
        expected, _, _ = score_slide_path(model, config, row["path"], slide_seed(SEED, row["slide_id"]))
        assert out["status"] == "ok" and out["predicted_class"] == expected.predicted_class
        assert [out[f"prob_{n}"] for n in config.class_names] == pytest.approx(expected.class_probabilities, abs=1e-4)


def test_evaluation_and_the_random_baseline_score_through_the_cohort_pipeline(
    ray_cluster: None, cohort: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """One scoring path: evaluate's predictions (random sampler, as the random baseline runs it; stages fused,
    the default without GPUs, a slide per block) are the cohort job's rows (stages split, two slides per block)
    for the same model, sampler and seed; both show progress while they run."""
    from jobs.evaluate import evaluate_rows, select_rows

    model, config, _ = load_checkpoint(checkpoint)
    out = tmp_path / "random-cohort"
    assert main(["--model", str(checkpoint), "--manifest", str(cohort), "--out", str(out), "--seed", str(SEED),
                 "--sampler", "random", "--stages", "split", "--slides-per-block", "2", "--quiet"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line[:1].isdigit()]
    # a progress line per block received (two slides each), counting up to every slide (3 scored, 1 failed)
    done = [int(line.split("/")[0]) for line in lines]
    assert done == sorted(done) and done[-1] == 4 and len(lines) >= 2
    assert all("slides/h" in line for line in lines) and lines[-1].startswith("4/4 slides: 3 scored, 1 failed")
    cohort_rows = {r["slide_id"]: r for r in read_scores(out)}
    cohort_tiles = pq.read_table(out / "tiles").to_pylist()

    rows = select_rows(cohort, task="her2")
    report = evaluate_rows(model, config, rows, sampler="random", seed=SEED, progress=True)
    assert "evaluate (random-sampling)" in capsys.readouterr().err  # the progress bar
    assert [p["slide_id"] for p in report.predictions] == [r["slide_id"] for r in rows if r["slide_id"] != "broken"]
    assert [(s["slide_id"], s["error"]) for s in report.skipped] == [("broken", "SlideError")]
    assert report.skipped[0]["reason"] in cohort_rows["broken"]["error"]
    for prediction in report.predictions:
        expected = cohort_rows[prediction["slide_id"]]
        assert expected["sampler"] == "random" and prediction["method"] == "random-sampling"
        for key in ("predicted_class", "n_tiles", "level0_pixels_read", *(f"prob_{n}" for n in config.class_names)):
            assert prediction[key] == pytest.approx(expected[key], abs=1e-6), key
    tiles = [(t["slide_id"], t["x0"], t["y0"], t["predicted_class"]) for t in report.tiles]
    assert sorted(tiles) == sorted((t["slide_id"], t["x0"], t["y0"], t["predicted_class"]) for t in cohort_tiles)


def test_a_job_killed_between_a_parts_tiles_and_slides_resumes_with_every_slide_once(
    cohort: Path, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a SIGKILL leaves (a finished part, then a part whose tiles were written but not its slides) is
    resumed exactly: the orphan tiles go, the finished slide is skipped, the others are scored once. The
    pipeline is replaced by the stages run in this process (no Ray), which is all the resume logic sees."""
    import jobs.score_cohort as score_cohort_module

    model, config, _ = load_checkpoint(checkpoint)
    settings = StageSettings(config=config, sampler="attention", seed=SEED)
    propose, agent = ProposeStage(model, settings), AgentStage(model, settings, "ckpt", None)

    def in_process(_model: object, _config: object, todo: list[dict], **_: object) -> Iterator[list[dict]]:
        for row in todo:  # scored_batches' stand-in
            yield [agent(read_tiles_stage(propose(row)))]

    monkeypatch.setattr(score_cohort_module, "scored_batches", in_process)
    monkeypatch.setattr("jobs.runtime.cluster.RaySession", lambda **_: contextlib.nullcontext())
    rows = [r for r in slides_in_manifest(cohort, "her2") if r["slide_id"] != "broken"]
    out = tmp_path / "killed"
    score_cohort_module._run_pipeline(model, config, rows[:1], out, score_cohort_module.CohortReport(out, 1, 0),
                                      model_name="ckpt", model_version=None, sampler="attention", seed=SEED,
                                      concurrency=1, propose_actors=1, cache_dir=None, progress=False,
                                      geojson=False)
    finished = next((out / "tiles").glob("*.parquet"))
    orphan = out / "tiles" / "part-001-00001.parquet"  # the killed part: its tiles made it, its slides did not
    shutil.copyfile(finished, orphan)

    report = score_cohort_module.score_cohort(model, config, rows, out, model_name="ckpt", seed=SEED)
    assert report.skipped == 1 and report.scored == len(rows) - 1 and not orphan.exists()
    written = [r["slide_id"] for p in sorted((out / "slides").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert sorted(written) == sorted(r["slide_id"] for r in rows)  # each slide exactly once
    tiles = pq.read_table(out / "tiles").to_pylist()
    assert len({(t["slide_id"], t["tile_index"]) for t in tiles}) == len(tiles) == sum(
        r["n_tiles"] for r in read_scores(out))


def test_slides_per_block_keeps_every_actor_busy_and_blocks_small() -> None:
    from jobs.score_cohort import default_slides_per_block

    for n_slides in (1, 3, 7, 20, 200, 5000):
        for actors in (1, 2, 5):
            per_block = default_slides_per_block(n_slides, actors)
            assert 1 <= per_block <= 8
            n_blocks = -(-n_slides // per_block)
            assert n_blocks >= min(n_slides, 4 * actors)  # at least 4 blocks per actor where there are slides


def test_the_stages_geojson_is_the_score_commands(cohort: Path, checkpoint: Path) -> None:
    """Run as plain objects (no Ray), the stages' GeoJSON has the features ``score --geojson`` writes for the
    same slide and seed (outlines drawn in stage 1, tiles and glimpses in stage 3)."""
    model, config, _ = load_checkpoint(checkpoint)
    settings = StageSettings(config=config, sampler="attention", seed=SEED, geojson=True)
    propose, agent = ProposeStage(model, settings), AgentStage(model, settings, "ckpt", "3")
    row = next(r for r in slides_in_manifest(cohort, "her2") if r["slide_id"] != "broken")
    out = agent(read_tiles_stage(propose(row)))
    collection = json.loads(out["geojson"])
    assert collection["properties"]["slide_id"] == row["slide_id"]
    assert collection["properties"]["model"] == {"name": "ckpt", "version": "3"}
    score, view, info = score_slide_path(model, config, row["path"], slide_seed(SEED, row["slide_id"]))
    expected = slide_score_geojson(score, view.tissue_mask, config.class_names, config.slide.thumbnail_downsample,
                                   info.dimensions, config.agent.glimpse_px)
    assert json.loads(json.dumps(expected["features"])) == collection["features"]
    no_geojson = StageSettings(config=config, sampler="attention", seed=SEED)  # off unless asked for
    assert AgentStage(model, no_geojson, "ckpt", "3")(read_tiles_stage(ProposeStage(model, no_geojson)(row)))[
        "geojson"] == ""


def test_geojson_paths_stay_in_the_output_folder(tmp_path: Path) -> None:
    assert geojson_path(tmp_path, "a") == tmp_path / "geojson" / "a.geojson"
    assert geojson_path(tmp_path, "site-1/a.b") == tmp_path / "geojson" / "site-1" / "a.b.geojson"
    for slide_id in ("../../etc/x", "/abs/x", "a\\..\\b"):
        path = geojson_path(tmp_path, slide_id)
        assert path.parent == tmp_path / "geojson" and ".." not in path.parts, slide_id
