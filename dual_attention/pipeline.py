"""The one place where SAM -> sampler -> tiles -> agent -> slide score is composed.

Training (Ray Train), evaluation, the random-sampling baseline and serving all call these functions;
Ray never appears here: tiles arrive through a plain ``ReadTiles`` callable that callers may back with
Ray actors, OpenSlide or a numpy array.

Stages:

- ``propose_tiles``: thumbnail -> attention map -> N level-0 boxes (``sampler="attention"``, the paper's
  sampler, or ``sampler="random"``, the Gumbel baseline over tissue). Seeded by ``seed``. The SAM's
  logits are computed in ``SAM_TILE_PX`` tiles with a receptive-field halo (``SoftAttentionNet.
  tiled_logits``), so its memory is bounded by the tile rather than the slide; the softmax runs over the
  whole map. Training keeps the one-pass SAM (it needs gradients, on small thumbnails).
- ``score_tiles``: tiles -> the agent's per-tile class probabilities and glimpse trails. Evaluation uses
  the policy **means** as glimpse locations; the random first glimpse (``agent.first_glimpse``) is drawn
  from a generator seeded by ``seed`` and the tile's index, as the sampler's noise in ``propose_tiles``
  is. ``score_slide`` is therefore deterministic per seed.
- ``aggregate``: tile scores -> slide score (HER2: dominant tile class; MMR: mean probability);
  ``combine_folds`` averages fold models' slide probabilities.

Training (``dual_attention.training``) uses the same networks, sampler and tile readers.

A ``profiling.StageTimer`` passed to ``score_slide`` / ``propose_tiles`` records the milliseconds of each
stage (soft attention, sampling, tile reads, agent, aggregation); callers add the stages they own (open,
thumbnail, tissue mask), as ``jobs.score`` does for its JSON's ``"profile"``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dual_attention.config import CLASS_NAMES, DualAttentionConfig
from dual_attention.metrics import aggregate_tile_probabilities, combine_fold_probabilities
from dual_attention.models import DualAttentionModel, images_to_tensor
from dual_attention.profiling import StageTimer
from dual_attention.sampling import (
    SampledLocations,
    locations_to_level0_boxes,
    random_locations,
    sample_locations,
)
from dual_attention.slides import Level0Box, SlideInfo, SlideView, open_slide, slide_view

ReadTiles = Callable[[Sequence[Level0Box]], np.ndarray]
"""For ONE slide: level-0 boxes -> (n, S, S, 3) uint8 tiles, S = config.tile.tile_level0_px, in order."""

# Float32 tile bytes per agent forward pass when scoring: the agent's working memory stays about this much
# whatever the number of tiles (a paper-size 2048² tile is 48 MiB as float32 and ~60 MiB with its pooled
# scales, so the CPU takes one at a time; 256² tiles go 85 at a time). A GPU has the memory for larger batches.
AGENT_CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 1 << 30}

# Side (thumbnail px) of the tiles in which inference computes the SAM's logits (``SoftAttentionNet.
# tiled_logits``): activation memory is bounded by this tile, not by the slide's area. Small tiles also
# ran faster on one CPU thread despite the halo (1024² thumbnail, CPU s, paper-her2 / paper-mmr:
# 128 px 0.74 / 1.94, 256 px 0.86 / 2.74, 512 px 1.64 / 3.08; activations that stay in cache), so 128.
SAM_TILE_PX = 128


class ScoringError(ValueError):
    """A slide cannot be scored (no tissue to sample, tiles of the wrong shape); the message says why."""


@dataclass
class TileProposal:
    level0_boxes: list[Level0Box]
    attention_weights: np.ndarray  # (n,) attention at each box's thumbnail centre
    attention_map: np.ndarray  # (h, w) float32 thumbnail-sized, sums to 1 (over tissue; 0 elsewhere)
    centers_thumb_rc: np.ndarray  # (n, 2) row, col on the thumbnail
    shortfall_reason: str | None  # why fewer than config.sampler.n_tiles boxes; None if all


@dataclass
class TileScore:
    level0_box: Level0Box
    attention_weight: float
    predicted_class: int
    class_probabilities: list[float]
    glimpse_trail_level0: list[tuple[float, float]]  # glimpse centres (x, y) in level-0 px, in order


@dataclass
class SlideScore:
    predicted_class: int
    predicted_label: str
    class_probabilities: list[float]
    confidence: float
    tiles: list[TileScore]
    attention_map: np.ndarray
    level0_pixels_read: int
    fraction_level0_read: float


def slide_score_record(score: SlideScore, class_names: Sequence[str]) -> dict[str, Any]:
    """A slide score as JSON-ready values: the one form of ``score``'s JSON and the HTTP answer's score fields
    (``serve.schemas.ScoreResponse``). Probabilities are lists in ``class_names`` order."""
    return {
        "predicted_class": int(score.predicted_class),
        "predicted_label": str(score.predicted_label),
        "class_probabilities": [float(p) for p in score.class_probabilities],
        "confidence": float(score.confidence),
        "level0_pixels_read": int(score.level0_pixels_read),
        "fraction_level0_read": float(score.fraction_level0_read),
        "tiles": [
            {
                "level0_box": {"x0": int(t.level0_box.x0), "y0": int(t.level0_box.y0),
                               "width": int(t.level0_box.width), "height": int(t.level0_box.height)},
                "attention_weight": float(t.attention_weight),
                "predicted_class": int(t.predicted_class),
                "predicted_label": str(class_names[t.predicted_class]),
                "class_probabilities": [float(p) for p in t.class_probabilities],
                "glimpse_trail_level0": [[float(x), float(y)] for x, y in t.glimpse_trail_level0],
            }
            for t in score.tiles
        ],
    }


def slide_seed(seed: int, slide_id: str) -> int:
    """A per-slide seed that does not depend on the order of the manifest (validation, evaluation,
    baselines and serving's default all use it)."""
    return (seed * 1_000_003 + zlib.crc32(slide_id.encode())) % (2**31 - 1)


# -- helpers -----------------------------------------------------------------------------------------------


def check_thumbnail(thumbnail: np.ndarray, tissue_mask: np.ndarray, what: str) -> None:
    if thumbnail.ndim != 3 or thumbnail.shape[2] != 3 or thumbnail.dtype != np.uint8:
        raise ScoringError(f"{what}: thumbnail must be (h, w, 3) uint8, got {thumbnail.shape} {thumbnail.dtype}")
    if tissue_mask.shape != thumbnail.shape[:2]:
        raise ScoringError(f"{what}: tissue_mask shape {tissue_mask.shape} != thumbnail shape {thumbnail.shape[:2]}")


def check_slide_fits_a_tile(level0_dims: tuple[int, int], tile_level0_px: int) -> None:
    """A slide must hold at least one whole tile: a box would otherwise reach past its edges, and the
    pixels "read" (and ``fraction_level0_read``) would count pixels the slide does not have."""
    width, height = level0_dims
    if width < tile_level0_px or height < tile_level0_px:
        raise ScoringError(f"slide of {width}x{height} level-0 px is smaller than one tile: the minimum size "
                           f"is {tile_level0_px}x{tile_level0_px} level-0 px")


def check_tiles(tiles: np.ndarray, n: int, tile_px: int, what: str) -> np.ndarray:
    tiles = np.asarray(tiles)
    if tiles.shape != (n, tile_px, tile_px, 3) or tiles.dtype != np.uint8:
        raise ScoringError(
            f"{what}: read_tiles returned {tiles.shape} {tiles.dtype}, expected ({n}, {tile_px}, {tile_px}, 3) uint8"
        )
    return tiles


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's parameters live: inputs are moved there, results come back to the CPU. Serve's
    stand-ins hold only an ``agent``; a stand-in whose networks move tensors themselves counts as the CPU."""
    for candidate in (model, getattr(model, "agent", None)):
        parameters = getattr(candidate, "parameters", None)
        if callable(parameters):
            return next(parameters()).device
    return torch.device("cpu")


def attention_map_of(model: DualAttentionModel, thumbnail: np.ndarray, tissue_mask: np.ndarray | None = None,
                     tile_px: int | None = SAM_TILE_PX) -> torch.Tensor:
    """The SAM's attention (h, w) over ``thumbnail`` (h, w, 3) uint8, a softmax over the tissue pixels
    when ``tissue_mask`` is given; with the autograd state of the caller. Without gradients the logits
    are computed in ``tile_px`` tiles (bounded memory, same values up to float rounding); with gradients
    (training) or ``tile_px=None`` in one pass."""
    device = model_device(model)
    mask = None if tissue_mask is None else torch.as_tensor(np.asarray(tissue_mask, dtype=bool), device=device)[None]
    tiled = tile_px if not torch.is_grad_enabled() else None
    # Tiled: the uint8 pixels go in as they are and each tile is converted on its own (bounded memory).
    if tiled:
        writable = thumbnail if thumbnail.flags.writeable else thumbnail.copy()  # torch wraps writable memory only
        pixels = torch.as_tensor(writable, device=device)[None]
    else:
        pixels = images_to_tensor(thumbnail).to(device)
    return model.soft_attention(pixels, mask, tile_px=tiled)[0]


def augment_tiles(tiles: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random rot90 (0-3 quarter turns) and horizontal flip per tile, drawn from ``rng``."""
    out = np.empty_like(tiles)
    turns = rng.integers(0, 4, size=len(tiles))
    flips = rng.integers(0, 2, size=len(tiles))
    for i, tile in enumerate(tiles):
        tile = np.rot90(tile, k=int(turns[i]), axes=(0, 1))
        out[i] = tile[:, ::-1] if flips[i] else tile
    return out


def location_to_level0(location_xy: np.ndarray, box: Level0Box) -> tuple[float, float]:
    """(x, y) in [-1, 1]^2 over the tile (affine_grid, align_corners=False) -> level-0 (x, y) px."""
    x, y = float(location_xy[0]), float(location_xy[1])
    return box.x0 + (x + 1.0) / 2.0 * box.width, box.y0 + (y + 1.0) / 2.0 * box.height


def _sample(attention: np.ndarray, tissue_mask: np.ndarray, config: DualAttentionConfig, rng: np.random.Generator,
            sampler: str) -> SampledLocations:
    if sampler == "attention":
        return sample_locations(attention, tissue_mask, config.sampler, config.soft_attention.attention_mask, rng)
    if sampler == "random":
        return random_locations(tissue_mask, config.sampler.n_tiles, rng)
    raise ValueError(f"unknown sampler {sampler!r}; expected 'attention' or 'random'")


# -- stage 1: soft attention and sampling ------------------------------------------------------------------


def propose_tiles(model: DualAttentionModel, thumbnail: np.ndarray, tissue_mask: np.ndarray,
                  level0_dims: tuple[int, int], config: DualAttentionConfig, seed: int,
                  sampler: str = "attention", timer: StageTimer | None = None,
                  sam_tile_px: int | None = SAM_TILE_PX) -> TileProposal:
    """SAM (softmax over the tissue pixels) -> sampler -> level-0 boxes, in evaluation mode (no
    gradients), seeded by ``seed``. The SAM's logits are computed in ``sam_tile_px`` tiles (None: in one
    pass, as before tiling; the two agree up to float rounding). ``timer`` records the stages."""
    check_thumbnail(thumbnail, tissue_mask, "propose_tiles")
    check_slide_fits_a_tile(level0_dims, config.tile.tile_level0_px)
    timer = timer or StageTimer()
    with timer.stage("soft_attention"), torch.inference_mode():
        # float32 as the SAM computes it: its consumers widen exactly where they do arithmetic (the sampler,
        # metrics, overlays, GeoJSON), so the tiles are those of a float64 copy, without its 25 MB at 3.2 GP.
        attention = attention_map_of(model, thumbnail, tissue_mask, tile_px=sam_tile_px).cpu().numpy()
    with timer.stage("sampling"):
        sampled = _sample(attention, np.asarray(tissue_mask, dtype=bool), config, np.random.default_rng(seed), sampler)
        centers = sampled.centers_thumb_rc
        boxes = locations_to_level0_boxes(centers, config.slide.thumbnail_downsample,
                                          config.tile.tile_level0_px, level0_dims)
    return TileProposal(
        level0_boxes=boxes,
        attention_weights=attention[centers[:, 0], centers[:, 1]] if len(centers) else np.zeros(0),
        attention_map=attention,
        centers_thumb_rc=centers,
        shortfall_reason=sampled.shortfall_reason,
    )


# -- stage 2: hard attention over the tiles ----------------------------------------------------------------


def first_glimpse_locations(agent: torch.nn.Module, n_tiles: int, seed: int) -> torch.Tensor:
    """(n_tiles, 2) CPU tensor: the random first glimpses of one slide's tiles, drawn from ``seed`` in one
    draw for all tiles, so that a tile's first glimpse does not depend on how tiles are batched (serving
    batches the tiles of several requests, each with its own seed)."""
    return agent.random_first_locations(n_tiles, torch.Generator().manual_seed(int(seed)))


def agent_chunk_tiles(tile_px: int, device: torch.device) -> int:
    """Tiles per agent forward pass when scoring (``AGENT_CHUNK_BYTES`` of float32 tiles, at least one)."""
    budget = AGENT_CHUNK_BYTES.get(device.type, AGENT_CHUNK_BYTES["cpu"])
    return max(1, budget // (3 * 4 * tile_px * tile_px))


def score_tiles(model: DualAttentionModel, tiles: np.ndarray, proposal: TileProposal, config: DualAttentionConfig,
                seed: int, first_locations: torch.Tensor | None = None) -> list[TileScore]:
    """The agent over each proposed tile, glimpsing at the policy means after a first glimpse drawn from
    ``seed`` (deterministic per seed); ``first_locations`` (n, 2) replaces that draw (serving's batches
    of several requests pass each request's own, see ``first_glimpse_locations``)."""
    n = len(proposal.level0_boxes)
    tiles = check_tiles(tiles, n, config.tile.tile_level0_px, "score_tiles")
    scores: list[TileScore] = []
    device = model_device(model)
    if first_locations is None:
        first_locations = first_glimpse_locations(model.agent, n, seed)
    first_glimpses = first_locations.to(device)
    chunk_tiles = agent_chunk_tiles(tiles.shape[1], device)
    with torch.no_grad():
        for start in range(0, n, chunk_tiles):
            chunk = images_to_tensor(tiles[start:start + chunk_tiles]).to(device)
            output = model.agent(chunk, deterministic=True, first_locations=first_glimpses[start:start + chunk_tiles])
            probs = output.class_log_probs[:, -1].exp().cpu().numpy()
            locations = output.locations.cpu().numpy()
            for j in range(len(chunk)):
                box = proposal.level0_boxes[start + j]
                scores.append(TileScore(
                    level0_box=box,
                    attention_weight=float(proposal.attention_weights[start + j]),
                    predicted_class=int(np.argmax(probs[j])),
                    class_probabilities=[float(p) for p in probs[j]],
                    glimpse_trail_level0=[location_to_level0(loc, box) for loc in locations[j]],
                ))
    return scores


def aggregate(tile_scores: Sequence[TileScore], task: str, level0_dims: tuple[int, int],
              attention_map: np.ndarray | None = None) -> SlideScore:
    """Tile scores -> slide score (see ``metrics.aggregate_tile_probabilities``)."""
    if not tile_scores:
        raise ScoringError("aggregate: no tile scores (no tissue was sampled)")
    predicted, confidence, mean = aggregate_tile_probabilities(
        np.array([t.class_probabilities for t in tile_scores]), task)
    pixels = sum(t.level0_box.width * t.level0_box.height for t in tile_scores)
    width, height = level0_dims
    return SlideScore(
        predicted_class=predicted,
        predicted_label=CLASS_NAMES[task][predicted],
        class_probabilities=[float(p) for p in mean],
        confidence=confidence,
        tiles=list(tile_scores),
        attention_map=np.zeros((0, 0)) if attention_map is None else attention_map,
        level0_pixels_read=int(pixels),
        fraction_level0_read=float(pixels / (width * height)),
    )


def combine_folds(fold_scores: Sequence[SlideScore], task: str) -> SlideScore:
    """One slide scored by several fold models -> mean class probabilities; tiles of all folds kept."""
    if not fold_scores:
        raise ValueError("combine_folds: no fold scores")
    predicted, confidence, mean = combine_fold_probabilities([s.class_probabilities for s in fold_scores])
    maps = [s.attention_map for s in fold_scores]
    same_shape = all(m.shape == maps[0].shape for m in maps)
    return SlideScore(
        predicted_class=predicted,
        predicted_label=CLASS_NAMES[task][predicted],
        class_probabilities=[float(p) for p in mean],
        confidence=confidence,
        tiles=[t for s in fold_scores for t in s.tiles],
        attention_map=np.mean(maps, axis=0, dtype=np.float64) if same_shape else maps[0],
        level0_pixels_read=int(sum(s.level0_pixels_read for s in fold_scores)),
        fraction_level0_read=float(sum(s.fraction_level0_read for s in fold_scores)),
    )


def score_slide(model: DualAttentionModel, thumbnail: np.ndarray, tissue_mask: np.ndarray,
                level0_dims: tuple[int, int], read_tiles: ReadTiles, config: DualAttentionConfig, seed: int,
                sampler: str = "attention", timer: StageTimer | None = None,
                sam_tile_px: int | None = SAM_TILE_PX) -> SlideScore:
    """Both stages end to end; deterministic for a given ``seed``. Raises ``ScoringError`` when no tile
    can be sampled (the proposal's shortfall reason is in the message). ``timer`` records the stages
    (soft attention, sampling, tile reads, agent, aggregation); ``sam_tile_px`` as in ``propose_tiles``."""
    timer = timer or StageTimer()
    proposal = propose_tiles(model, thumbnail, tissue_mask, level0_dims, config, seed, sampler=sampler,
                             timer=timer, sam_tile_px=sam_tile_px)
    if not proposal.level0_boxes:
        raise ScoringError(f"no tiles to score: {proposal.shortfall_reason}")
    with timer.stage("tile_reads"):
        tiles = read_tiles(proposal.level0_boxes)
    with timer.stage("agent"):
        tile_scores = score_tiles(model, tiles, proposal, config, seed)
    with timer.stage("aggregation"):
        return aggregate(tile_scores, config.task, level0_dims, attention_map=proposal.attention_map)


def score_slide_path(model: DualAttentionModel, config: DualAttentionConfig, slide_path: str | Path, seed: int = 0,
                     timer: StageTimer | None = None) -> tuple[SlideScore, SlideView, SlideInfo]:
    """Both stages on one slide file, tiles read in-process. Returns the score, the slide's view (thumbnail,
    tissue mask, level-0 size) and its info (its mpp / objective power and where they came from); ``timer`` records every stage
    (open, thumbnail, tissue mask and the pipeline's own)."""
    timer = timer or StageTimer()
    with timer.stage("open"):
        slide = open_slide(slide_path)
    with slide:
        # the thumbnail first: a corrupt file says so before a slide smaller than a tile is refused
        view = slide_view(slide, config.slide.thumbnail_downsample, config.slide.tissue_min_area_thumb_px, timer)
        check_slide_fits_a_tile(view.level0_dims, config.tile.tile_level0_px)

        def read_tiles(boxes: list[Level0Box]) -> np.ndarray:
            return slide.read_boxes(boxes)

        with torch.no_grad():
            score = score_slide(model, view.thumbnail, view.tissue_mask, view.level0_dims, read_tiles, config, seed,
                                timer=timer)
        info = slide.info
    return score, view, info
