"""The composed pipeline: proposals, scoring (numpy and OpenSlide tile readers), aggregation, training
steps in both modes, and checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dual_attention.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dual_attention.config import preset
from dual_attention.models import DualAttentionModel
from dual_attention.pipeline import (
    ScoringError,
    TileScore,
    aggregate,
    augment_tiles,
    combine_folds,
    location_to_level0,
    propose_tiles,
    score_slide,
    score_tiles,
)
from dual_attention.slides import Level0Box, open_slide, tissue_mask
from dual_attention.training import (
    SlideBatch,
    TrainingStep,
    optimise,
    sam_loss_weight,
    training_phase,
    training_step,
)

DOWNSAMPLE = 32


class ArraySlide:
    """A level-0 RGB array with a tissue rectangle, its thumbnail and a numpy ReadTiles."""

    def __init__(self, seed: int, width: int = 1536, height: int = 1024, label: int = 0) -> None:
        rng = np.random.default_rng(seed)
        image = np.full((height, width, 3), 240, np.uint8)
        image[128:896, 192:1344] = rng.integers(60, 200, size=(768, 1152, 3), dtype=np.uint8)
        self.level0 = image
        self.dims = (width, height)
        self.label = label
        self.thumbnail = image.reshape(height // DOWNSAMPLE, DOWNSAMPLE, width // DOWNSAMPLE, DOWNSAMPLE, 3).mean(
            (1, 3)).astype(np.uint8)
        self.tissue = np.zeros(self.thumbnail.shape[:2], bool)
        self.tissue[4:28, 6:42] = True
        self.boxes_read: list[Level0Box] = []

    def read_tiles(self, boxes) -> np.ndarray:
        self.boxes_read += list(boxes)
        return np.stack([self.level0[b.y0:b.y0 + b.height, b.x0:b.x0 + b.width] for b in boxes])


@pytest.fixture(scope="module")
def config():
    return preset("cpu-small")


@pytest.fixture(scope="module")
def model(config) -> DualAttentionModel:
    torch.manual_seed(0)
    model = DualAttentionModel(config)
    torch.nn.init.normal_(model.soft_attention.to_logit.weight, std=0.5)  # a non-uniform map to sample from
    return model.eval()


def test_propose_tiles(model, config) -> None:
    slide = ArraySlide(0)
    proposal = propose_tiles(model, slide.thumbnail, slide.tissue, slide.dims, config, seed=3)
    assert proposal.attention_map.shape == slide.thumbnail.shape[:2]
    assert proposal.attention_map.sum() == pytest.approx(1.0, abs=1e-5)
    assert np.all(proposal.attention_map[~slide.tissue] == 0), "a softmax over tissue pixels"
    n = len(proposal.level0_boxes)
    assert 1 <= n <= config.sampler.n_tiles
    assert proposal.centers_thumb_rc.shape == (n, 2) and proposal.attention_weights.shape == (n,)
    rows, cols = proposal.centers_thumb_rc.T
    assert np.all(slide.tissue[rows, cols])
    assert np.allclose(proposal.attention_weights, proposal.attention_map[rows, cols])
    for box in proposal.level0_boxes:
        assert box.width == box.height == config.tile.tile_level0_px
        assert 0 <= box.x0 <= slide.dims[0] - box.width and 0 <= box.y0 <= slide.dims[1] - box.height
    again = propose_tiles(model, slide.thumbnail, slide.tissue, slide.dims, config, seed=3)
    assert again.level0_boxes == proposal.level0_boxes
    other = [propose_tiles(model, slide.thumbnail, slide.tissue, slide.dims, config, seed=s).level0_boxes
             for s in range(4, 8)]
    assert any(boxes != proposal.level0_boxes for boxes in other), "the seed drives the sampler's noise"


def test_propose_tiles_random_baseline_and_bad_sampler(model, config) -> None:
    slide = ArraySlide(0)
    proposal = propose_tiles(model, slide.thumbnail, slide.tissue, slide.dims, config, seed=0, sampler="random")
    assert len(proposal.level0_boxes) == config.sampler.n_tiles
    assert np.all(slide.tissue[proposal.centers_thumb_rc[:, 0], proposal.centers_thumb_rc[:, 1]])
    with pytest.raises(ValueError, match="unknown sampler"):
        propose_tiles(model, slide.thumbnail, slide.tissue, slide.dims, config, seed=0, sampler="grid")
    with pytest.raises(ScoringError, match="tissue_mask shape"):
        propose_tiles(model, slide.thumbnail, slide.tissue[1:], slide.dims, config, seed=0)


def test_score_slide_is_deterministic_and_consistent(model, config) -> None:
    slide = ArraySlide(1)
    score = score_slide(model, slide.thumbnail, slide.tissue, slide.dims, slide.read_tiles, config, seed=5)
    again = score_slide(model, slide.thumbnail, slide.tissue, slide.dims, slide.read_tiles, config, seed=5)
    assert score.class_probabilities == again.class_probabilities
    assert [t.glimpse_trail_level0 for t in score.tiles] == [t.glimpse_trail_level0 for t in again.tiles]
    assert sum(score.class_probabilities) == pytest.approx(1.0, abs=1e-5)
    assert score.predicted_label == config.class_names[score.predicted_class]
    assert 0 < score.confidence <= 1
    tile_px = config.tile.tile_level0_px
    assert score.level0_pixels_read == len(score.tiles) * tile_px**2
    assert score.fraction_level0_read == pytest.approx(len(score.tiles) * tile_px**2 / (1536 * 1024))
    assert score.attention_map.shape == slide.thumbnail.shape[:2]
    for tile in score.tiles:
        assert len(tile.glimpse_trail_level0) == config.agent.n_glimpses
        box = tile.level0_box
        for x, y in tile.glimpse_trail_level0:
            assert box.x0 <= x <= box.x0 + box.width and box.y0 <= y <= box.y0 + box.height
        assert tile.predicted_class == int(np.argmax(tile.class_probabilities))


def test_one_json_record_of_a_slide_score_is_the_http_answers_score_fields(model, config) -> None:
    """``slide_score_record`` is the form of both ``score``'s JSON and the HTTP answer: every field of it is a
    field of ``ScoreResponse`` (its tiles validate as ``TileOut``), with the score's own values."""
    import json

    from dual_attention.pipeline import slide_score_record
    from serve.schemas import ScoreResponse, TileOut

    slide = ArraySlide(1)
    score = score_slide(model, slide.thumbnail, slide.tissue, slide.dims, slide.read_tiles, config, seed=5)
    record = json.loads(json.dumps(slide_score_record(score, config.class_names)))
    assert set(record) <= set(ScoreResponse.model_fields)
    assert record["class_probabilities"] == pytest.approx(score.class_probabilities)
    assert record["predicted_label"] == config.class_names[record["predicted_class"]]
    for tile, out in zip(score.tiles, record["tiles"], strict=True):
        parsed = TileOut(**out)
        assert (parsed.level0_box.x0, parsed.level0_box.y0) == (tile.level0_box.x0, tile.level0_box.y0)
        assert parsed.predicted_label == config.class_names[tile.predicted_class]
        assert np.allclose(parsed.glimpse_trail_level0, tile.glimpse_trail_level0)


def test_score_slide_from_an_openslide_slide(model, config, shared_slides: Path) -> None:
    with open_slide(shared_slides / "aperio" / "CMU-1-Small-Region.svs") as slide:
        thumbnail = slide.thumbnail(config.slide.thumbnail_downsample)
        mask = tissue_mask(thumbnail)
        tile_px = config.tile.tile_level0_px

        def read_tiles(boxes):
            return np.stack([slide.read_box(box) for box in boxes])

        score = score_slide(model, thumbnail, mask, slide.dimensions, read_tiles, config, seed=0)
    assert mask.any() and 1 <= len(score.tiles) <= config.sampler.n_tiles
    assert all(t.level0_box.width == tile_px for t in score.tiles)
    assert sum(score.class_probabilities) == pytest.approx(1.0, abs=1e-5)


def test_score_slide_refuses_no_tissue_and_bad_tiles(model, config) -> None:
    slide = ArraySlide(2)
    with pytest.raises(ScoringError, match="no tissue"):
        score_slide(model, slide.thumbnail, np.zeros_like(slide.tissue), slide.dims, slide.read_tiles, config, 0)

    def wrong_size(boxes):
        return np.zeros((len(boxes), 10, 10, 3), np.uint8)

    with pytest.raises(ScoringError, match=r"expected \(\d+, 256, 256, 3\) uint8"):
        score_slide(model, slide.thumbnail, slide.tissue, slide.dims, wrong_size, config, 0)


def test_score_tiles_maps_glimpses_to_level0(model, config) -> None:
    slide = ArraySlide(3)
    proposal = propose_tiles(model, slide.thumbnail, slide.tissue, slide.dims, config, seed=0)
    tiles = slide.read_tiles(proposal.level0_boxes)
    scores = score_tiles(model, tiles, proposal, config, seed=0)
    first_glimpses = model.agent.random_first_locations(len(tiles), torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.agent(torch.as_tensor(tiles).permute(0, 3, 1, 2).float() / 255, deterministic=True,
                          first_locations=first_glimpses)
    for t in range(out.locations.shape[1]):
        location = out.locations[0, t].numpy()
        assert scores[0].glimpse_trail_level0[t] == pytest.approx(location_to_level0(location,
                                                                                     proposal.level0_boxes[0]))
    # the paper's random first glimpse: seeded, so the same seed gives the same trail, another seed another
    assert score_tiles(model, tiles, proposal, config, seed=0)[0].glimpse_trail_level0 == \
        scores[0].glimpse_trail_level0
    assert score_tiles(model, tiles, proposal, config, seed=1)[0].glimpse_trail_level0[0] != \
        scores[0].glimpse_trail_level0[0]
    box = Level0Box(100, 200, 256, 256)
    assert location_to_level0(np.array([-1.0, 1.0]), box) == (100.0, 456.0)
    assert location_to_level0(np.array([0.0, 0.0]), box) == (228.0, 328.0)


def _tile_score(probs, x0=0) -> TileScore:
    return TileScore(Level0Box(x0, 0, 100, 100), 0.1, int(np.argmax(probs)), list(probs), [])


def test_aggregate_and_combine_folds() -> None:
    tiles = [_tile_score([0.1, 0.1, 0.7, 0.1]), _tile_score([0.1, 0.1, 0.6, 0.2], 100),
             _tile_score([0.0, 0.0, 0.1, 0.9], 200)]
    score = aggregate(tiles, "her2", (1000, 1000))
    assert score.predicted_class == 2 and score.predicted_label == "2+"
    assert score.level0_pixels_read == 30_000 and score.fraction_level0_read == pytest.approx(0.03)
    with pytest.raises(ScoringError, match="no tile scores"):
        aggregate([], "her2", (1000, 1000))
    other = aggregate([_tile_score([0.0, 0.0, 0.0, 1.0])], "her2", (1000, 1000))
    combined = combine_folds([score, other], "her2")
    expected = (np.array(score.class_probabilities) + np.array(other.class_probabilities)) / 2
    assert combined.class_probabilities == pytest.approx(expected.tolist())
    assert combined.predicted_class == int(np.argmax(expected)) and len(combined.tiles) == 4


def test_augment_tiles_rotates_and_flips_with_the_rng() -> None:
    tiles = np.random.default_rng(0).integers(0, 255, size=(6, 8, 8, 3), dtype=np.uint8)
    a = augment_tiles(tiles, np.random.default_rng(1))
    b = augment_tiles(tiles, np.random.default_rng(1))
    assert np.array_equal(a, b) and not np.array_equal(a, tiles)
    for original, out in zip(tiles, a, strict=True):
        variants = [np.rot90(original, k, axes=(0, 1)) for k in range(4)]
        variants += [v[:, ::-1] for v in variants]
        assert any(np.array_equal(out, v) for v in variants)


def _batch(n_slides: int = 4) -> tuple[SlideBatch, list[ArraySlide]]:
    slides = [ArraySlide(10 + i, label=i % 4) for i in range(n_slides)]
    batch = SlideBatch([s.thumbnail for s in slides], [s.tissue for s in slides], [s.label for s in slides],
                       [s.dims for s in slides], [s.read_tiles for s in slides])
    return batch, slides


def _has_grad(parameters) -> bool:
    return any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in parameters)


def test_joint_training_step_four_slides_by_four_tiles(config) -> None:
    # L_SA from the first step (the preset holds it off for the agent's warm-up)
    config = config.with_overrides({"loss.beta": 0.0, "loss.alpha_hold_epochs": 0, "train.sam_warmup_steps": 0})
    torch.manual_seed(0)
    model = DualAttentionModel(config)
    batch, slides = _batch()
    loss, terms = training_step(model, batch, epoch=1, config=config, rng=np.random.default_rng(0))
    assert terms["n_tiles"] == 16 and all(len(s.boxes_read) == 4 for s in slides)
    assert all(math.isfinite(v) for k, v in terms.items() if k not in ("attention_tumour_ratio",
                                                                      "tiles_tumour_fraction"))
    assert terms["sam_weight"] == pytest.approx(config.loss.alpha)
    assert terms["l_j"] == pytest.approx(terms["l_ha"] + config.loss.alpha * terms["l_sa"], rel=1e-5)
    assert terms["l_ha"] == pytest.approx(terms["l_theta"] + config.loss.delta * (terms["l_bb"] + terms["l_s"]),
                                          rel=1e-5)
    loss.backward()
    # with beta = 0 the only path from the loss to the attention is REINFORCE through the drawn tiles
    assert _has_grad(model.soft_attention.to_logit.parameters())
    assert _has_grad(model.soft_attention.features.parameters())  # the near-uniform start is not degenerate
    assert not _has_grad(model.tile_features.parameters())  # the ATS head is not in the agent-reward loss
    assert _has_grad(model.agent.location.parameters()) and _has_grad(model.agent.classifier.parameters())


def test_ats_signal_reaches_the_tile_features_and_head(config) -> None:
    config = config.with_overrides({"loss.beta": 0.0, "loss.sam_signal": "ats", "train.sam_warmup_steps": 0})
    torch.manual_seed(0)
    model = DualAttentionModel(config)
    loss, terms = training_step(model, _batch()[0], epoch=0, config=config, rng=np.random.default_rng(0))
    loss.backward()
    # the paper's signal: the expectation over the sampled tiles carries the gradient to the attention
    assert _has_grad(model.soft_attention.to_logit.parameters())
    assert _has_grad(model.tile_features.parameters()) and _has_grad(model.sam_head.parameters())


def test_sam_weight_schedule(config) -> None:
    paper = config.with_overrides({"loss.alpha": 0.5, "loss.alpha_hold_epochs": 0, "train.sam_warmup_steps": 0})
    assert [sam_loss_weight(paper, e, 0) for e in range(3)] == [1.0, 0.5, 0.25]
    held = paper.with_overrides({"loss.alpha_hold_epochs": 2, "train.sam_warmup_steps": 10})
    assert sam_loss_weight(held, 0, 9) == 0.0  # the agent's warm-up: no L_SA yet
    assert [sam_loss_weight(held, e, 10) for e in range(4)] == [1.0, 1.0, 1.0, 0.5]


def test_training_step_is_reproducible(config) -> None:
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = DualAttentionModel(config)
        loss, terms = training_step(model, _batch()[0], epoch=0, config=config, rng=np.random.default_rng(42))
        terms.pop("tile_wait_s")  # a wall-clock time, the one term that is not a function of the seeds
        results.append((loss.item(), terms))
    assert str(results[0]) == str(results[1])  # str: NaN terms compare equal as text


def test_separate_mode_trains_agent_then_sam(config) -> None:
    separate = config.with_overrides({"train.mode": "separate", "train.epochs": 4})
    assert [training_phase(separate, e) for e in range(4)] == ["agent", "agent", "sam", "sam"]
    ats = separate.with_overrides({"loss.sam_signal": "ats"})
    assert [training_phase(ats, e) for e in range(4)] == ["sam", "sam", "agent", "agent"]
    assert training_phase(config, 3) == "joint"
    torch.manual_seed(0)
    model = DualAttentionModel(separate)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss, terms = training_step(model, _batch()[0], epoch=2, config=separate, rng=np.random.default_rng(0))
    assert terms["trains_sam"] == 1 and terms["trains_agent"] == 0 and math.isnan(terms["l_ha"])
    assert terms["l_j"] == pytest.approx(terms["l_sa"], rel=1e-6)
    loss.backward()
    assert _has_grad(model.soft_attention.parameters()) and not _has_grad(model.agent_parameters())

    model.zero_grad(set_to_none=True)
    terms = optimise(TrainingStep(model, separate), model, optimizer, _batch()[0], 0, separate,
                     np.random.default_rng(0), 0)
    assert terms["trains_sam"] == 0 and terms["trains_agent"] == 1 and math.isnan(terms["l_sa"])
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.startswith("agent.") for n in moved)  # the SAM half stays frozen


def test_training_step_skips_slides_without_tissue(config) -> None:
    torch.manual_seed(0)
    model = DualAttentionModel(config)
    batch, _ = _batch(2)
    batch.tissue_masks[0] = np.zeros_like(batch.tissue_masks[0])
    _, terms = training_step(model, batch, 0, config, np.random.default_rng(0))
    assert terms["slides_skipped"] == 1 and terms["n_tiles"] == 4
    batch.tissue_masks[1] = np.zeros_like(batch.tissue_masks[1])
    with pytest.raises(ScoringError, match="none of the 2 slides"):
        training_step(model, batch, 0, config, np.random.default_rng(0))


def test_checkpoint_round_trip(tmp_path: Path, model, config) -> None:
    path = save_checkpoint(tmp_path / "ckpt", model, config, extra={"epoch": 3, "val_f1": 0.5})
    assert path.name == "model.pt"
    loaded, loaded_config, extra = load_checkpoint(tmp_path / "ckpt")
    assert loaded_config.digest() == config.digest() and extra == {"epoch": 3, "val_f1": 0.5}
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    slide = ArraySlide(4)
    first = score_slide(model, slide.thumbnail, slide.tissue, slide.dims, slide.read_tiles, config, seed=1)
    second = score_slide(loaded, slide.thumbnail, slide.tissue, slide.dims, slide.read_tiles, loaded_config, seed=1)
    assert first.class_probabilities == second.class_probabilities


def test_checkpoint_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        load_checkpoint(tmp_path / "missing")
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"model\.pt: not a readable checkpoint"):
        load_checkpoint(bad)


def test_fit_runs_the_training_loop_without_ray_and_reports_what_it_learns(config) -> None:
    from dual_attention.training import SlideExample, fit

    run = config.with_overrides({"train.epochs": 2, "train.steps_per_epoch": 2, "train.sam_warmup_steps": 1,
                                 "train.attention_check_epoch": 1})
    slides = [ArraySlide(20 + i, label=i % 4) for i in range(8)]
    examples = [SlideExample(f"s{i}", s.label, s.thumbnail, s.tissue, s.dims, s.read_tiles,
                             tumour_mask=s.tissue & (np.arange(s.tissue.shape[1]) < 20)[None, :])
                for i, s in enumerate(slides)]
    torch.manual_seed(0)
    model = DualAttentionModel(run)
    seen = []
    history = fit(model, run, examples[:4], examples[4:], on_epoch=seen.append)
    assert [r.epoch for r in history] == [0, 1] and seen == history
    first, last = history
    assert first.train["sam_weight"] == pytest.approx(0.5)  # step 0 warm-up (0), step 1 full weight (1)
    assert last.train["sam_weight"] == 1.0 and last.train["location_std"] < run.agent.location_std_start
    for key in ("accuracy", "f1_macro", "attention_entropy", "attention_tumour_ratio", "glimpse_spread"):
        assert math.isfinite(last.val[key]), key
    # two steps cannot move the attention: the early warning says so at the check epoch, and only there
    assert first.warning is None and last.warning is not None and "flat" in last.warning


def test_the_workers_loop_runs_without_ray_shares_the_epoch_and_checkpoints(config, tmp_path: Path) -> None:
    """The Ray Train worker's loop (``EpochLoop``) in one process: two ranks of one epoch take disjoint
    halves of the same batch plan and of the validation slides, a slide whose reads fail leaves training
    under its slide id, the gathered shares make one report, and the checkpoint restores weights,
    optimiser and epoch."""
    from dual_attention.slides import SlideError
    from dual_attention.training import (
        EpochLoop,
        SlideExample,
        build_optimizer,
        class_balanced_batches,
        epoch_metrics,
        load_train_state,
        save_training_checkpoint,
        val_predictions_of,
    )

    run = config.with_overrides({"train.epochs": 1, "train.steps_per_epoch": 1, "train.sam_warmup_steps": 0,
                                 "train.slides_per_batch": 4})
    slides = [ArraySlide(40 + i, label=i % 4) for i in range(12)]

    def broken(boxes):  # noqa: ANN001, ANN202
        raise SlideError("/slides/t3.svs", "truncated JPEG tile")

    examples = [SlideExample(f"t{i}", s.label, s.thumbnail, s.tissue, s.dims, s.read_tiles, path=f"/slides/t{i}.svs")
                for i, s in enumerate(slides)]
    examples[3].read_tiles = broken
    plan = class_balanced_batches([e.label for e in examples[:8]], 4, 4, 2, np.random.default_rng([run.train.seed, 0]))
    shares, loops = [], []
    for rank in (0, 1):
        for slide in slides:
            slide.boxes_read = []
        torch.manual_seed(0)
        model = DualAttentionModel(run)
        optimizer, scheduler = build_optimizer(model, run)
        loop = EpochLoop(model, run, optimizer, scheduler, examples[:8], examples[8:], rank=rank, world=2)
        share, validated = loop.run_epoch(0)
        assert share.steps == 1 and {v.example.slide_id for v in validated} == {f"t{8 + rank}", f"t{10 + rank}"}
        # this rank's step read its batch of the shared plan (less the broken slide), and nothing else
        assert {i for i in range(8) if slides[i].boxes_read} == set(plan[rank]) - {3}
        shares.append(share)
        loops.append(loop)
    (failed,) = [share for share in shares if share.bad_slides]  # t3 is in one batch: named by slide id
    assert list(failed.bad_slides) == ["t3"] and "truncated JPEG tile" in failed.bad_slides["t3"]

    metrics = epoch_metrics(run, 0, shares, loops[0].optimizer)
    assert metrics["val_n_slides"] == 4 and metrics["train_steps_per_worker"] == 1.0
    assert metrics["val_primary"] == metrics["val_agreement_points_per_case"]
    assert metrics["slides_skipped_in_training"] == 1.0 and metrics["level0_pixels_read"] > 0

    loop = loops[0]
    rows = sorted(r for share in shares for r in [row["slide_id"] for row in share.val_rows])
    save_training_checkpoint(tmp_path / "ckpt", loop.model, run, loop.optimizer, loop.scheduler, 0, metrics,
                             [r for share in shares for r in share.val_rows], extra={"val_fold": 2})
    fresh = DualAttentionModel(run)
    fresh_optimizer, fresh_scheduler = build_optimizer(fresh, run)
    assert load_train_state(tmp_path / "ckpt", fresh, fresh_optimizer, fresh_scheduler) == 0
    for (name, a), b in zip(fresh.state_dict().items(), loop.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert fresh_optimizer.state_dict()["state"].keys() == loop.optimizer.state_dict()["state"].keys()
    assert fresh_scheduler.state_dict() == loop.scheduler.state_dict()
    assert sorted(r["slide_id"] for r in val_predictions_of(tmp_path / "ckpt")) == rows
    assert load_checkpoint(tmp_path / "ckpt")[2]["val_fold"] == 2


def test_a_steps_tile_reads_run_at_once(config) -> None:
    """Each slide's read starts as soon as its boxes are drawn and runs beside the others: here every read
    waits until all four are in flight, which a step reading slide by slide would never reach."""
    import threading

    batch, slides = _batch()
    all_in_flight = threading.Barrier(len(slides), timeout=20)

    def read_when_all_started(slide: ArraySlide):
        def read(boxes):
            all_in_flight.wait()  # BrokenBarrierError after 20 s if the reads were sequential
            return slide.read_tiles(boxes)
        return read

    batch.read_tiles = [read_when_all_started(s) for s in slides]
    torch.manual_seed(0)
    _, terms = training_step(DualAttentionModel(config), batch, epoch=0, config=config,
                             rng=np.random.default_rng(0))
    assert terms["n_tiles"] == 16 and terms["tile_wait_s"] >= 0.0
