"""Training the dual attention model, without Ray: one step, one epoch, validation, checkpoint contents.

``EpochLoop`` is the whole loop of one worker (its share of each epoch's batches and validation slides);
the Ray Train worker (``jobs.train.train_loop_per_worker``) adds only Ray's context, DDP, gathering the
workers' ``EpochShare``s and the report, and ``fit`` runs the same loop alone in this process (tests,
benchmarks). Ray never appears here.

One step (``training_step``), per slide of a batch with every class present:

1. the SAM's attention over the thumbnail (a softmax over tissue), with gradient while L_SA is on;
2. N tiles drawn from that attention (``sampler.train_sampler="gumbel"``: Gumbel keys on log-attention,
   the first N at least ``d_t`` apart: samples of the distribution the SAM's gradient is taken of), read
   through the slide's ``ReadTiles`` in a background thread (the read starts as soon as the boxes are
   drawn, so the slides' reads run side by side and beside the next slides' SAM) and flipped/rotated at
   random; ``tile_wait_s`` is the time the step blocked on reads;
3. the agent over all the batch's tiles in one batch (one episode per tile; locations drawn, std annealed
   per optimiser step, a random first glimpse): L_HA = L_θ + δ·(L_bb + L_s);
4. L_SA. With ``loss.sam_signal="agent_reward"`` (default): REINFORCE through the draw,
   −Σ_tiles (r − b)·log a(tile) averaged over slides, r = the agent's probability of the slide's label on
   the tile (detached), b = the slide's mean r; plus β·Σ a log a. Tiles on which the agent reads the
   label get more attention, tiles without evidence less: the signal does not change sign with the class
   (the ATS head's does, measured). ``"ats"``: the paper's expectation of tile features into the SAM head.
5. L_J = L_HA + w·L_SA with w = α^max(0, epoch − ``loss.alpha_hold_epochs``), and w = 0 for the first
   ``train.sam_warmup_steps`` optimiser steps (the agent must read before its reward means anything).

Separate mode trains one half per phase: with the agent-reward signal the agent first (epochs
[0, ceil(E/2))), then the SAM on the frozen agent's rewards; with "ats" the SAM first, as before.

``optimise`` wraps one step with the backward pass, the frozen half's gradients cleared and the SAM's
gradient norm; ``validate`` scores held-out slides with ``pipeline.score_slide`` (each with its
``slide_seed``, as evaluation does) and measures what the attention and the glimpses do
(``epoch_diagnostics``); ``epoch_metrics`` turns the workers' shares into the epoch's report.
``attention_has_not_moved`` is the early warning. A checkpoint folder holds ``model.pt``, the optimiser
state and the epoch's metrics (``save_training_checkpoint`` / ``load_train_state``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dual_attention import losses, metrics
from dual_attention.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dual_attention.config import DualAttentionConfig
from dual_attention.expectation import expected_features
from dual_attention.metrics import aggregate_tile_probabilities
from dual_attention.models import DualAttentionModel, images_to_tensor
from dual_attention.pipeline import (
    ReadTiles,
    ScoringError,
    SlideScore,
    attention_map_of,
    augment_tiles,
    check_thumbnail,
    check_tiles,
    model_device,
    score_slide,
    slide_seed,
)
from dual_attention.sampling import attention_draw, locations_to_level0_boxes, sample_locations
from dual_attention.slides import SlideError

TRAIN_STATE_FILE = "train_state.pt"  # optimiser + scheduler state beside model.pt in a checkpoint
METRICS_FILE = "metrics.json"  # the epoch's metrics and validation predictions, beside model.pt
TILE_READ_THREADS = 8  # concurrent slide reads of a step: reads wait on I/O or on reader actors, not on us
FLAT_ENTROPY = 0.995  # normalised attention entropy above this: the map has not moved from uniform
MOVED_TUMOUR_RATIO = 1.1  # attention on tumour ÷ tumour's share at or below this: not on tumour


@dataclass
class SlideBatch:
    thumbnails: list[np.ndarray]
    tissue_masks: list[np.ndarray]
    labels: list[int]
    level0_dims: list[tuple[int, int]]
    read_tiles: list[ReadTiles]
    slide_ids: list[str] = field(default_factory=list)  # optional, named in error messages
    tumour_masks: list[np.ndarray | None] = field(default_factory=list)  # optional, for diagnostics only


# -- batches with every class present ----------------------------------------------------------------------


def class_balanced_batches(labels: Sequence[int], num_classes: int, slides_per_batch: int, n_batches: int,
                           rng: np.random.Generator) -> list[list[int]]:
    """``n_batches`` batches of indices into ``labels``, each holding at least one slide of every class.

    Each class has its own shuffled queue, refilled when used up, so every slide of a class is drawn once
    before any is drawn twice. A batch takes one slide per class, then fills its remaining places from a
    queue over all slides (class frequencies as in the data), avoiding repeats inside a batch while it can.
    """
    labels = [int(label) for label in labels]
    if slides_per_batch < num_classes:
        raise ValueError(
            f"train.slides_per_batch ({slides_per_batch}) must be at least the number of classes ({num_classes}) "
            "so that every class is present in a batch"
        )
    by_class = {c: [i for i, label in enumerate(labels) if label == c] for c in range(num_classes)}
    missing = [c for c, members in by_class.items() if not members]
    if missing:
        raise ValueError(f"no training slide of class(es) {missing}: a batch with every class present is impossible")

    def queue(members: list[int]) -> Callable[[], int]:
        pending: list[int] = []

        def take() -> int:
            if not pending:
                pending.extend(int(i) for i in rng.permutation(members))
            return pending.pop()

        return take

    take_class = {c: queue(members) for c, members in by_class.items()}
    take_any = queue(list(range(len(labels))))
    batches: list[list[int]] = []
    for _ in range(n_batches):
        batch = [take_class[c]() for c in range(num_classes)]
        attempts = 0
        while len(batch) < slides_per_batch:
            index = take_any()
            attempts += 1
            if index not in batch or attempts > 4 * len(labels):
                batch.append(index)
        batches.append([batch[i] for i in rng.permutation(len(batch))])
    return batches


def steps_per_epoch(config: DualAttentionConfig, n_train_slides: int, world_size: int) -> int:
    """Steps each worker takes per epoch: ``train.steps_per_epoch``, or one pass over the training slides."""
    if config.train.steps_per_epoch > 0:
        return config.train.steps_per_epoch
    return max(1, math.ceil(n_train_slides / (config.train.slides_per_batch * world_size)))


# -- schedules -----------------------------------------------------------------------------------------------


def training_phase(config: DualAttentionConfig, epoch: int) -> str:
    """"joint"; in separate mode "agent" then "sam" (agent-reward signal: the SAM learns from a trained
    agent's rewards), or "sam" then "agent" (ATS signal), switching at epoch ceil(E/2)."""
    if config.train.mode == "joint":
        return "joint"
    first, second = ("agent", "sam") if config.loss.sam_signal == "agent_reward" else ("sam", "agent")
    return first if epoch < math.ceil(config.train.epochs / 2) else second


def sam_loss_weight(config: DualAttentionConfig, epoch: int, global_step: int) -> float:
    """The weight of L_SA in this step: α^max(0, epoch − hold) in joint mode, 1 in the SAM phase of
    separate mode, 0 during the agent's warm-up steps and in the agent phase."""
    phase = training_phase(config, epoch)
    if phase == "agent":
        return 0.0
    if phase == "sam":
        return 1.0
    if global_step < config.train.sam_warmup_steps:
        return 0.0
    return config.loss.alpha ** max(0, epoch - config.loss.alpha_hold_epochs)


def location_std(config: DualAttentionConfig, global_step: int) -> float:
    """The policy's std at this optimiser step: linear from ``location_std_start`` to ``location_std``
    over ``location_std_anneal_steps`` steps, then constant."""
    agent = config.agent
    if agent.location_std_anneal_steps <= 0:
        return agent.location_std
    progress = min(1.0, global_step / agent.location_std_anneal_steps)
    return agent.location_std_start + progress * (agent.location_std - agent.location_std_start)


_TILE_READERS: ThreadPoolExecutor | None = None


def _tile_readers() -> ThreadPoolExecutor:
    """The process's threads for a step's tile reads, made on first use."""
    global _TILE_READERS
    if _TILE_READERS is None:
        _TILE_READERS = ThreadPoolExecutor(TILE_READ_THREADS, thread_name_prefix="tile-read")
    return _TILE_READERS


# -- one step --------------------------------------------------------------------------------------------------


def _draw(attention: np.ndarray, tissue: np.ndarray, config: DualAttentionConfig, rng: np.random.Generator):
    if config.sampler.train_sampler == "gumbel":
        return attention_draw(attention, tissue, config.sampler, rng)
    return sample_locations(attention, tissue, config.sampler, config.soft_attention.attention_mask, rng)


def training_step(model: DualAttentionModel, batch: SlideBatch, epoch: int, config: DualAttentionConfig,
                  rng: np.random.Generator, augment: bool = True, global_step: int = 0
                  ) -> tuple[torch.Tensor, dict[str, float]]:
    """One batch of slides -> (loss to back-propagate, its terms as floats); see the module docstring.

    Slides with no tissue are skipped and counted (``slides_skipped``); a batch with none left raises
    ``ScoringError``. Terms not computed in this step are NaN."""
    phase = training_phase(config, epoch)
    sam_weight = sam_loss_weight(config, epoch, global_step)
    train_sam, train_agent = sam_weight > 0, phase in ("joint", "agent")
    ats = config.loss.sam_signal == "ats"
    n_slides = len(batch.thumbnails)
    if not (len(batch.tissue_masks) == len(batch.labels) == len(batch.level0_dims) == len(batch.read_tiles)
            == n_slides) or n_slides == 0:
        raise ValueError("SlideBatch fields must be non-empty lists of the same length")
    tile_px = config.tile.tile_level0_px
    downsample = config.slide.thumbnail_downsample
    device = model_device(model)
    model.agent.location.std = location_std(config, global_step)

    # 1. Every slide's attention and draw. Each slide's tile read starts as soon as its boxes are known, in
    #    a background thread, so that the reads run side by side and overlap the next slides' SAM (the
    #    boxes depend on the current SAM, so they cannot be fetched before the step).
    proposed: list[tuple[int, torch.Tensor, np.ndarray, Any, str]] = []
    entropies, tumour_ratios, tumour_fractions = [], [], []
    for i in range(n_slides):
        what = f"slide {batch.slide_ids[i] if i < len(batch.slide_ids) else i}"
        check_thumbnail(batch.thumbnails[i], batch.tissue_masks[i], what)
        tissue = batch.tissue_masks[i].astype(bool)
        with torch.set_grad_enabled(train_sam):
            attention = attention_map_of(model, batch.thumbnails[i], tissue)
        attention_np = attention.detach().cpu().numpy().astype(np.float64)
        centers = _draw(attention_np, tissue, config, rng).centers_thumb_rc
        if len(centers) == 0:
            continue
        boxes = locations_to_level0_boxes(centers, downsample, tile_px, batch.level0_dims[i])
        proposed.append((i, attention, centers, _tile_readers().submit(batch.read_tiles[i], boxes), what))
        entropies.append(metrics.attention_entropy_normalised(attention_np, tissue))
        tumour = batch.tumour_masks[i] if i < len(batch.tumour_masks) else None
        if tumour is not None:
            tumour_ratios.append(metrics.attention_on_tumour_ratio(attention_np, tissue, tumour))
            tumour_fractions += metrics.tumour_fraction_of_boxes(boxes, tumour, downsample)
    skipped = n_slides - len(proposed)
    if not proposed:
        raise ScoringError(f"training_step: none of the {n_slides} slides had tissue to sample")

    # 2. The tiles as their reads finish (they ran side by side), then the agent over all of them in one
    #    batch (one episode per tile): per-slide agent calls would hide the last reads too, but cost ~20%
    #    more CPU per step in Python and kernel-launch overhead (measured), and CPU is what a worker lacks.
    slide_tiles, slide_labels, attention_at_tiles, attention_maps = [], [], [], []
    tile_wait_s = 0.0
    for i, attention, centers, pending_read, what in proposed:
        waited_from = time.perf_counter()
        tiles = pending_read.result()  # a SlideError from the read is raised here
        tile_wait_s += time.perf_counter() - waited_from
        tiles = check_tiles(tiles, len(centers), tile_px, what)
        if augment:
            tiles = augment_tiles(tiles, rng)
        slide_tiles.append(images_to_tensor(tiles).to(device))
        slide_labels.append(int(batch.labels[i]))
        attention_maps.append(attention)
        attention_at_tiles.append(attention[torch.as_tensor(centers[:, 0], device=device),
                                            torch.as_tensor(centers[:, 1], device=device)])
    sizes = [len(t) for t in slide_tiles]
    tile_labels = torch.as_tensor([label for label, size in zip(slide_labels, sizes, strict=True)
                                   for _ in range(size)], device=device)
    generator = torch.Generator(device=device).manual_seed(int(rng.integers(0, 2**63 - 1)))
    with torch.set_grad_enabled(train_agent):
        output = model.agent(torch.cat(slide_tiles), generator=generator)
    last_log_probs = output.class_log_probs[:, -1].detach()
    reward = last_log_probs.gather(1, tile_labels[:, None])[:, 0].exp()  # p(label) per tile

    nan = float("nan")
    total = torch.zeros((), device=device)
    terms: dict[str, float] = {}
    slide_probs = [p.exp().cpu().numpy() for p in torch.split(last_log_probs, sizes)]
    slide_correct = [aggregate_tile_probabilities(p, config.task)[0] == label
                     for p, label in zip(slide_probs, slide_labels, strict=True)]
    if train_sam:
        neg_entropy = torch.stack([losses.entropy_term(a) for a in attention_maps]).mean()
        if ats:
            features = model.tile_features(torch.cat(slide_tiles))
            expected = [expected_features(a, f) for a, f in zip(attention_at_tiles, torch.split(features, sizes),
                                                                 strict=True)]
            sam_logits = model.sam_head(torch.stack(expected))
            labels_t = torch.as_tensor(slide_labels, device=device)
            signal = torch.nn.functional.cross_entropy(sam_logits, labels_t)
            sam_accuracy = float((sam_logits.argmax(1) == labels_t).float().mean())
        else:
            signal = losses.attention_reinforce_loss(attention_at_tiles, torch.split(reward, sizes))
            sam_accuracy = float(np.mean(slide_correct))
        l_sa = signal + config.loss.beta * neg_entropy
        total = total + sam_weight * l_sa
        terms |= {"l_sa": l_sa.item(), "sam_signal": signal.item(), "sam_neg_entropy": neg_entropy.item(),
                  "sam_accuracy": sam_accuracy}
    else:
        terms |= {"l_sa": nan, "sam_signal": nan, "sam_neg_entropy": nan, "sam_accuracy": nan}
    if train_agent:
        agent = losses.agent_losses(output.class_log_probs, output.log_pi, output.baselines, output.means,
                                    tile_labels, config.agent.glimpse_px / tile_px, config.loss.delta)
        total = total + agent.l_ha
        terms |= {"l_ha": agent.l_ha.item(), "l_theta": agent.l_theta.item(), "reinforce": agent.reinforce.item(),
                  "nll": agent.nll.item(), "baseline_mse": agent.baseline_mse.item(), "l_bb": agent.l_bb.item(),
                  "l_s": agent.l_s.item(), "tile_accuracy": agent.accuracy_last_step,
                  "mean_reward": agent.mean_reward}
    else:
        terms |= {k: nan for k in ("l_ha", "l_theta", "reinforce", "nll", "baseline_mse", "l_bb", "l_s",
                                   "tile_accuracy", "mean_reward")}
    terms |= {
        "l_j": total.item(), "sam_weight": sam_weight, "location_std": model.agent.location.std,
        "slide_accuracy": float(np.mean(slide_correct)), "tile_p_label": float(reward.mean()),
        "attention_entropy": _mean(entropies), "attention_tumour_ratio": _mean(tumour_ratios),
        "tiles_tumour_fraction": _mean(tumour_fractions),
        "glimpse_spread": metrics.glimpse_spread(output.locations.cpu().numpy()),
        "n_tiles": float(sum(sizes)), "tile_wait_s": tile_wait_s, "slides_skipped": float(skipped), "trains_sam": float(train_sam),
        "trains_agent": float(train_agent),
    }
    return total, terms


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


class TrainingStep(nn.Module):
    """``training_step`` inside ``forward``, so that a DDP wrapper's gradient hooks see the step."""

    def __init__(self, model: DualAttentionModel, config: DualAttentionConfig) -> None:
        super().__init__()
        self.model = model
        self.config = config

    def forward(self, batch: SlideBatch, epoch: int, rng: np.random.Generator, global_step: int
                ) -> tuple[torch.Tensor, dict[str, float]]:
        return training_step(self.model, batch, epoch, self.config, rng, augment=True, global_step=global_step)


def sam_side_modules(model: DualAttentionModel) -> list[nn.Module]:
    return [model.soft_attention, model.tile_features, model.sam_head]


def build_optimizer(model: DualAttentionModel, config: DualAttentionConfig) -> tuple[Any, Any]:
    """Adam with ``lr_sam`` for SAM + f_f + SAM head and ``lr_agent`` for the agent; StepLR per epoch."""
    sam_params = [p for module in sam_side_modules(model) for p in module.parameters()]
    agent_params = list(model.agent.parameters())
    covered = {id(p) for p in sam_params + agent_params}
    rest = [p for p in model.parameters() if id(p) not in covered]
    groups = [{"params": sam_params, "lr": config.train.lr_sam, "name": "sam"},
              {"params": agent_params + rest, "lr": config.train.lr_agent, "name": "agent"}]
    optimizer = torch.optim.Adam(groups)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.train.lr_step_size,
                                                gamma=config.train.lr_gamma)
    return optimizer, scheduler


def optimise(step_module: nn.Module, model: DualAttentionModel, optimizer: torch.optim.Optimizer,
             batch: SlideBatch, epoch: int, config: DualAttentionConfig, rng: np.random.Generator,
             global_step: int) -> dict[str, float]:
    """One optimiser step through ``step_module`` (``TrainingStep``, DDP-wrapped or not); returns the
    step's terms plus the SAM's gradient norm. The half that a separate-mode phase freezes keeps its
    weights (Adam would move them on zero gradients)."""
    loss, terms = step_module(batch, epoch, rng, global_step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    phase = training_phase(config, epoch)
    if phase != "joint":
        sam_side = {id(p) for module in sam_side_modules(model) for p in module.parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if (id(p) in sam_side) != (phase == "sam"):
                    p.grad = None
    grads = [p.grad for p in model.soft_attention.parameters() if p.grad is not None]
    terms["sam_grad_norm"] = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads \
        else 0.0
    optimizer.step()
    return terms


def optimise_skipping_bad_slides(step_module: nn.Module, model: DualAttentionModel, optimizer: torch.optim.Optimizer,
                                 make_batch: Callable[[Sequence[str]], SlideBatch], slide_ids: Sequence[str],
                                 epoch: int, config: DualAttentionConfig, rng: np.random.Generator, global_step: int,
                                 bad_slides: dict[str, str], slide_of_path: Callable[[str], str]) -> dict[str, float]:
    """``optimise`` on the batch of ``slide_ids``; a slide whose tiles cannot be read (``SlideError``)
    leaves the batch, and training, for good (recorded in ``bad_slides``), and the step is retried
    without it. Raises the error when no slide of the batch is left."""
    while True:
        members = [s for s in slide_ids if s not in bad_slides]
        try:
            return optimise(step_module, model, optimizer, make_batch(members), epoch, config, rng, global_step)
        except SlideError as error:
            bad_slides[slide_of_path(error.path)] = str(error)
            if not [s for s in members if s not in bad_slides]:
                raise


# -- validation ------------------------------------------------------------------------------------------------


@dataclass
class SlideExample:
    """A slide as training and validation see it."""

    slide_id: str
    label: int
    thumbnail: np.ndarray
    tissue_mask: np.ndarray
    level0_dims: tuple[int, int]
    read_tiles: ReadTiles
    tumour_mask: np.ndarray | None = None
    path: str | None = None  # the slide file: a read error naming it is put down to this slide


@dataclass
class ValidatedSlide:
    example: SlideExample
    seed: int
    score: SlideScore


def validate(model: DualAttentionModel, config: DualAttentionConfig, examples: Sequence[SlideExample],
             seed_of: Callable[[str], int], bad_slides: dict[str, str]) -> list[ValidatedSlide]:
    """Score each example with ``pipeline.score_slide`` (evaluation mode, its own seed); a slide that
    cannot be read or scored goes into ``bad_slides`` and is left out."""
    was_training = model.training
    model.eval()
    scored: list[ValidatedSlide] = []
    try:
        for example in examples:
            if example.slide_id in bad_slides:
                continue
            seed = seed_of(example.slide_id)
            try:
                with torch.no_grad():
                    score = score_slide(model, example.thumbnail, example.tissue_mask, example.level0_dims,
                                        example.read_tiles, config, seed=seed)
            except (SlideError, ScoringError) as error:
                bad_slides[example.slide_id] = str(error)
                continue
            scored.append(ValidatedSlide(example, seed, score))
    finally:
        model.train(was_training)
    return scored


def prediction_row(validated: ValidatedSlide, config: DualAttentionConfig) -> dict[str, Any]:
    """One validation prediction, with the slide's attention and glimpse diagnostics."""
    example, score = validated.example, validated.score
    tissue = example.tissue_mask.astype(bool)
    row: dict[str, Any] = {
        "slide_id": example.slide_id, "label": example.label, "predicted": score.predicted_class,
        "probabilities": score.class_probabilities, "confidence": score.confidence,
        "attention_entropy": metrics.attention_entropy_normalised(score.attention_map, tissue),
        "attention_tumour_ratio": float("nan"), "tiles_tumour_fraction": float("nan"),
        "glimpse_trails": [[list(point) for point in _trail_in_tile(t)] for t in score.tiles],
    }
    if example.tumour_mask is not None:
        row["attention_tumour_ratio"] = metrics.attention_on_tumour_ratio(score.attention_map, tissue,
                                                                          example.tumour_mask)
        row["tiles_tumour_fraction"] = _mean(metrics.tumour_fraction_of_boxes(
            [t.level0_box for t in score.tiles], example.tumour_mask, config.slide.thumbnail_downsample))
    return row


def _trail_in_tile(tile: Any) -> list[tuple[float, float]]:
    """A tile's glimpse trail in [-1, 1]² of the tile (the frame ``glimpse_spread`` compares)."""
    box = tile.level0_box
    return [(2.0 * (x - box.x0) / box.width - 1.0, 2.0 * (y - box.y0) / box.height - 1.0)
            for x, y in tile.glimpse_trail_level0]


def primary_validation_key(task: str) -> str:
    """The key of the task's primary metric among an epoch's ``val_*`` figures (folds, the best-fold alias
    and Tune's default ranking use it)."""
    return f"val_{metrics.primary_metric(task)}"


def validation_metrics(task: str, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``metrics.slide_metrics`` of ``prediction_row`` rows."""
    return metrics.slide_metrics(task, [r["label"] for r in rows], [r["predicted"] for r in rows],
                                 [r["probabilities"] for r in rows], [r["confidence"] for r in rows])


def epoch_diagnostics(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """What the attention and the glimpses did on the validation slides: mean normalised attention
    entropy, attention on tumour ÷ tumour share, tumour fraction of the sampled tiles, and the spread of
    glimpse locations across all validation tiles."""
    trails = [trail for row in rows for trail in row["glimpse_trails"]]
    return {
        "attention_entropy": _mean([r["attention_entropy"] for r in rows]),
        "attention_tumour_ratio": _mean([r["attention_tumour_ratio"] for r in rows]),
        "tiles_tumour_fraction": _mean([r["tiles_tumour_fraction"] for r in rows]),
        "glimpse_spread": metrics.glimpse_spread(np.asarray(trails)) if trails else float("nan"),
    }


def attention_has_not_moved(diagnostics: dict[str, float]) -> str | None:
    """A warning when the validation attention is still flat, or (where tumour masks exist) no more on
    tumour than chance; None when it has moved."""
    entropy, ratio = diagnostics.get("attention_entropy", float("nan")), diagnostics.get("attention_tumour_ratio",
                                                                                         float("nan"))
    if math.isfinite(entropy) and entropy > FLAT_ENTROPY:
        return f"the attention map is still flat (normalised entropy {entropy:.4f} > {FLAT_ENTROPY})"
    if math.isfinite(ratio) and ratio <= MOVED_TUMOUR_RATIO:
        return (f"the attention is not on tumour (mass on tumour ÷ tumour share {ratio:.2f} <= "
                f"{MOVED_TUMOUR_RATIO})")
    return None


# -- the loop: one worker's epochs (a process alone is rank 0 of 1) ----------------------------------------------


@dataclass
class ReadTimer:
    """Seconds spent inside the wrapped ``ReadTiles`` and level-0 pixels read. A step's reads run in
    several threads at once (``training_step``), so this is read time, not time the step waited: that is
    the step's ``tile_wait_s``."""

    read_s: float = 0.0
    level0_pixels: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def wrap(self, read_tiles: ReadTiles) -> ReadTiles:
        def timed(boxes: Any) -> np.ndarray:
            start = time.perf_counter()
            try:
                return read_tiles(boxes)
            finally:
                with self._lock:
                    self.read_s += time.perf_counter() - start
                    self.level0_pixels += sum(int(b.width) * int(b.height) for b in boxes)

        return timed

    def reset(self) -> None:
        with self._lock:
            self.read_s, self.level0_pixels = 0.0, 0


@dataclass
class EpochShare:
    """One worker's share of an epoch: plain data, gathered from every worker for ``epoch_metrics``."""

    terms: dict[str, float]  # mean step terms
    val_rows: list[dict[str, Any]]  # ``prediction_row`` per validation slide of this worker
    train_seconds: float
    train_tile_wait_s: float  # the time the steps blocked on tile reads
    read_s: float  # inside ReadTiles, training and validation
    level0_pixels: int
    epoch_seconds: float
    bad_slides: dict[str, str]
    steps: int


class EpochLoop:
    """The epochs of one worker, without Ray. ``rank`` of ``world`` workers takes every ``world``-th batch
    of the epoch's class-balanced plan (drawn from the epoch's seed, so every worker draws the same plan)
    and validates every ``world``-th validation slide, each with its ``slide_seed``; alone it is rank 0 of
    1. ``step_module`` is the ``TrainingStep`` the steps go through (DDP-wrapped under Ray Train); the
    model itself validates. A slide whose tiles cannot be read leaves training for good (``bad_slides``)."""

    def __init__(self, model: DualAttentionModel, config: DualAttentionConfig, optimizer: torch.optim.Optimizer,
                 scheduler: Any, train_examples: Sequence[SlideExample], val_examples: Sequence[SlideExample] = (),
                 *, step_module: nn.Module | None = None, rank: int = 0, world: int = 1) -> None:
        self.model, self.config, self.optimizer, self.scheduler = model, config, optimizer, scheduler
        self.step_module = step_module if step_module is not None else TrainingStep(model, config)
        self.rank, self.world = rank, world
        self.timer = ReadTimer()
        self.train_examples = {e.slide_id: self._timed(e) for e in train_examples}
        self.val_examples = [self._timed(e) for e in val_examples]
        self.bad_slides: dict[str, str] = {}
        self._slide_of_path = {e.path: e.slide_id for e in (*train_examples, *val_examples) if e.path}
        self.steps_per_epoch = steps_per_epoch(config, len(self.train_examples), world)

    def _timed(self, example: SlideExample) -> SlideExample:
        return dataclasses.replace(example, read_tiles=self.timer.wrap(example.read_tiles))

    def run_epoch(self, epoch: int, validate_now: bool = True) -> tuple[EpochShare, list[ValidatedSlide]]:
        """Train this worker's steps of ``epoch``, step the scheduler, validate this worker's slides."""
        started = time.perf_counter()
        self.timer.reset()
        step_terms = self.train_epoch(epoch)
        train_seconds = time.perf_counter() - started
        validated = self.validate() if validate_now else []
        share = EpochShare(
            terms=mean_terms(step_terms), val_rows=[prediction_row(v, self.config) for v in validated],
            train_seconds=train_seconds, train_tile_wait_s=float(sum(t.get("tile_wait_s", 0.0) for t in step_terms)),
            read_s=self.timer.read_s, level0_pixels=self.timer.level0_pixels,
            epoch_seconds=time.perf_counter() - started, bad_slides=dict(self.bad_slides), steps=len(step_terms))
        return share, validated

    def train_epoch(self, epoch: int) -> list[dict[str, float]]:
        config, seed = self.config, self.config.train.seed
        live = [i for i in self.train_examples if i not in self.bad_slides]
        plan = class_balanced_batches([self.train_examples[i].label for i in live], config.num_classes,
                                      config.train.slides_per_batch, self.steps_per_epoch * self.world,
                                      np.random.default_rng([seed, epoch]))
        self.step_module.train()
        step_terms = []
        for step, indices in enumerate(plan[self.rank::self.world]):
            step_terms.append(optimise_skipping_bad_slides(
                self.step_module, self.model, self.optimizer,
                lambda members: batch_of([self.train_examples[m] for m in members]),
                [live[i] for i in indices], epoch, config, np.random.default_rng([seed, epoch, step, self.rank]),
                epoch * self.steps_per_epoch + step, self.bad_slides, lambda path: self._slide_of_path.get(path, path)))
        self.scheduler.step()
        return step_terms

    def validate(self) -> list[ValidatedSlide]:
        """This worker's share of the validation slides, scored as evaluation scores them."""
        seed = self.config.train.seed
        return validate(self.model, self.config, self.val_examples[self.rank::self.world],
                        lambda slide_id: slide_seed(seed, slide_id), self.bad_slides)


def validation_figures(task: str, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Slide metrics and attention/glimpse diagnostics over ``prediction_row`` rows."""
    return validation_metrics(task, rows) | epoch_diagnostics(rows)


def epoch_metrics(config: DualAttentionConfig, epoch: int, shares: Sequence[EpochShare],
                  optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """One epoch's report from every worker's share: mean training terms (``train_*``), validation
    metrics and diagnostics over all validation slides (``val_*``, ``val_primary``), timings, and the
    attention warning at its epoch."""
    rows = sorted((r for share in shares for r in share.val_rows), key=lambda r: r["slide_id"])
    val = validation_figures(config.task, rows)
    terms = mean_terms([share.terms for share in shares if share.terms])
    train_s = [share.train_seconds for share in shares]
    wait_s = [share.train_tile_wait_s for share in shares]
    bad_slides = {k: v for share in shares for k, v in share.bad_slides.items()}
    out: dict[str, Any] = {"epoch": epoch, "phase": training_phase(config, epoch)}
    out |= {f"train_{k}": v for k, v in terms.items()}
    out |= {f"val_{k}": v for k, v in val.items()}
    out |= {
        "lr_sam": optimizer.param_groups[0]["lr"], "lr_agent": optimizer.param_groups[1]["lr"],
        "epoch_seconds": max(share.epoch_seconds for share in shares),
        "train_seconds": max(train_s),
        # per worker, averaged: time blocked on tile reads vs the rest of the training steps
        "train_tile_wait_seconds": float(np.mean(wait_s)),
        "train_compute_seconds": float(np.mean([t - w for t, w in zip(train_s, wait_s, strict=True)])),
        "train_tile_wait_fraction": float(np.sum(wait_s) / max(np.sum(train_s), 1e-9)),
        "tile_wait_seconds_total": float(sum(share.read_s for share in shares)),  # inside ReadTiles, train + val
        "level0_pixels_read": float(sum(share.level0_pixels for share in shares)),
        "train_steps_per_worker": float(max(share.steps for share in shares)),
        "slides_skipped_in_training": float(len(bad_slides)),
        "bad_slides": json.dumps(bad_slides, sort_keys=True),
    }
    out["val_primary"] = out.get(primary_validation_key(config.task), float("nan"))
    if epoch == config.train.attention_check_epoch:
        warning = attention_has_not_moved(val)
        out["attention_warning"] = warning or ""  # printed by rank 0
        out["attention_moved"] = 0.0 if warning else 1.0  # the figure MLflow keeps
    return out


def format_figure(value: Any) -> str:
    """A figure for a progress line or table: 4 significant digits, nan, or n/a for None."""
    if value is None:  # a figure that is undefined (AUROC on one class) or missing
        return "n/a"
    if isinstance(value, float):
        return "nan" if not math.isfinite(value) else f"{value:.4g}"
    return str(value)


def epoch_line(metrics: dict[str, Any], epochs: int, primary: str) -> str:
    """The progress line: losses, whether the attention has moved (entropy 1 = flat; on tumour ÷ share
    1 = blind to tumour), how well the agent reads, whether its glimpses differ between tiles, and time."""
    def figure(key: str) -> str:
        return format_figure(metrics.get(key))

    return (f"[train] epoch {metrics['epoch'] + 1}/{epochs} ({metrics['phase']}) "
            f"l_j={figure('train_l_j')} l_sa={figure('train_l_sa')} l_ha={figure('train_l_ha')} "
            f"tile_acc={figure('train_tile_accuracy')} attn_entropy={figure('val_attention_entropy')} "
            f"attn_on_tumour={figure('val_attention_tumour_ratio')} glimpse_spread={figure('val_glimpse_spread')} "
            f"val_acc={figure('val_accuracy')} {primary}={figure(primary)} "
            f"tile_wait={figure('train_tile_wait_fraction')} {metrics['epoch_seconds']:.1f}s")


# -- checkpoint contents ---------------------------------------------------------------------------------------


def save_training_checkpoint(directory: str | Path, model: DualAttentionModel, config: DualAttentionConfig,
                             optimizer: torch.optim.Optimizer, scheduler: Any, epoch: int,
                             metrics: dict[str, Any], val_rows: Sequence[dict[str, Any]],
                             extra: dict[str, Any] | None = None) -> Path:
    """An epoch's checkpoint folder: ``model.pt`` (weights + config + epoch, the numeric metrics and
    ``extra``), the optimiser and scheduler state (``TRAIN_STATE_FILE``) and the epoch's metrics with its
    validation predictions (``METRICS_FILE``)."""
    directory = Path(directory)
    save_checkpoint(directory, model, config, extra={
        "epoch": epoch, **(extra or {}),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float) or k == "phase"},
    })
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch},
               directory / TRAIN_STATE_FILE)
    (directory / METRICS_FILE).write_text(json.dumps({"metrics": metrics, "val_predictions": list(val_rows)},
                                                     indent=1, default=float))
    return directory


def load_train_state(directory: str | Path, model: DualAttentionModel, optimizer: torch.optim.Optimizer,
                     scheduler: Any) -> int:
    """Load weights (+ optimiser/scheduler when saved) from a checkpoint folder; returns its epoch."""
    directory = Path(directory)
    loaded, _, extra = load_checkpoint(directory)
    model.load_state_dict(loaded.state_dict())
    state_path = directory / TRAIN_STATE_FILE
    if state_path.is_file():
        # weights_only: a checkpoint folder may come from anywhere (--resume, Tune's storage); unpickling
        # arbitrary objects from it would run code. Adam's and StepLR's state dicts are plain tensors,
        # numbers, lists and dicts, which the restricted unpickler accepts.
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        except Exception as error:  # torch raises several types for corrupt, foreign or poisoned files
            raise CheckpointError(f"{state_path}: not a readable training state "
                                  f"({type(error).__name__}: {error})") from error
    return int(extra.get("epoch", -1))


def val_predictions_of(checkpoint_dir: str | Path) -> list[dict[str, Any]]:
    """The validation predictions saved with a checkpoint (none for a folder without ``METRICS_FILE``)."""
    path = Path(checkpoint_dir) / METRICS_FILE
    return json.loads(path.read_text())["val_predictions"] if path.is_file() else []


# -- the whole loop, in one process ------------------------------------------------------------------------------


@dataclass
class EpochRecord:
    epoch: int
    train: dict[str, float]  # mean step terms
    val: dict[str, Any]  # slide metrics + diagnostics
    seconds: float
    warning: str | None = None


def fit(model: DualAttentionModel, config: DualAttentionConfig, train_examples: Sequence[SlideExample],
        val_examples: Sequence[SlideExample] = (), on_epoch: Callable[[EpochRecord], None] | None = None,
        validate_every: int = 1) -> list[EpochRecord]:
    """``config.train.epochs`` epochs of the ``EpochLoop`` in this process (no DDP, rank 0 of 1),
    validating every ``validate_every`` epochs and at the end: the steps a Ray Train worker runs."""
    optimizer, scheduler = build_optimizer(model, config)
    loop = EpochLoop(model, config, optimizer, scheduler, train_examples, val_examples)
    history: list[EpochRecord] = []
    for epoch in range(config.train.epochs):
        validate_now = bool(val_examples) and ((epoch + 1) % validate_every == 0 or epoch == config.train.epochs - 1)
        share, _ = loop.run_epoch(epoch, validate_now)
        val = validation_figures(config.task, share.val_rows) if validate_now else {}
        warning = attention_has_not_moved(val) if validate_now and epoch == config.train.attention_check_epoch \
            else None
        record = EpochRecord(epoch, share.terms, val, share.epoch_seconds, warning)
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
    return history


def batch_of(examples: Sequence[SlideExample]) -> SlideBatch:
    return SlideBatch(
        thumbnails=[e.thumbnail for e in examples], tissue_masks=[e.tissue_mask for e in examples],
        labels=[e.label for e in examples], level0_dims=[e.level0_dims for e in examples],
        read_tiles=[e.read_tiles for e in examples], slide_ids=[e.slide_id for e in examples],
        tumour_masks=[e.tumour_mask for e in examples])


def mean_terms(dicts: Sequence[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean over steps, ignoring NaN (terms a phase did not compute)."""
    keys = sorted({k for d in dicts for k in d})
    return {key: _mean([d[key] for d in dicts if key in d]) for key in keys}
