"""The two model stages as Serve deployments, each scaling on its own.

- ``SoftAttentionStage``: slide -> thumbnail, tissue mask, attention map, level-0 tile boxes
  (``pipeline.propose_tiles``).
- ``HardAttentionStage``: tiles -> per-tile class probabilities and glimpse trails
  (``pipeline.score_tiles``), batched over the tiles of concurrent requests with ``@serve.batch``.

Both load the same pinned model (see ``serve.model_source``). A model that fails to load does not fail
the replica: the stage keeps the reason and answers every call with ``ModelNotLoaded`` (HTTP 503), so
the service stays up and says why.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import time
import types
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ray import serve

from dual_attention.annotations import region_features
from dual_attention.config import DualAttentionConfig
from dual_attention.pipeline import (
    TileProposal,
    TileScore,
    check_slide_fits_a_tile,
    first_glimpse_locations,
    propose_tiles,
    score_tiles,
)
from dual_attention.profiling import StageTimer, one_malloc_arena
from dual_attention.slides import Slide, SlideHandleCache, SlideInfo, SlideView, open_slide, slide_view
from serve.model_source import ModelLoadError, ModelRef, load_model
from serve.settings import MAX_BATCH_TILES


class ModelNotLoaded(RuntimeError):
    """The stage has no model (it failed to load); the message says why (HTTP 503)."""


class NoTissue(ValueError):
    """Nothing to sample on the slide (HTTP 422)."""


class DeadlineExceeded(TimeoutError):
    """The request's deadline passed; the message names the stage and the deadline (HTTP 504)."""


class SlideTooLarge(ValueError):
    """The slide's header declares more than this server reads per request (HTTP 413); the message
    names the limit and the slide's declared size."""


@dataclass(frozen=True)
class SlideLimits:
    """Per-request bounds on the work a slide may cause, checked on its header before any pixel is read."""

    max_level0_pixels: int
    max_thumbnail_decode_bytes: int

    def check(self, slide: Slide, downsample: int) -> None:
        width, height = slide.dimensions
        if width * height > self.max_level0_pixels:
            raise SlideTooLarge(f"slide declares {width}x{height} level-0 px ({width * height:,} px), over this "
                                f"server's limit max_level0_pixels={self.max_level0_pixels:,}")
        decode_bytes = slide.thumbnail_decode_bytes(downsample)
        if decode_bytes > self.max_thumbnail_decode_bytes:
            level_width, level_height = slide.info.level_dimensions[slide.thumbnail_level(downsample)]
            raise SlideTooLarge(f"slide's thumbnail needs {decode_bytes:,} decoded bytes (its level of "
                                f"{level_width}x{level_height} px; no coarser pyramid level), over this server's "
                                f"limit max_thumbnail_decode_bytes={self.max_thumbnail_decode_bytes:,}")


def request_config(config: DualAttentionConfig, n_tiles: int | None) -> DualAttentionConfig:
    """The model's config with a request's N: the sampler keeps its 2N candidates (paper)."""
    if n_tiles is None or n_tiles == config.sampler.n_tiles:
        return config
    return config.with_overrides({"sampler.n_tiles": n_tiles,
                                  "sampler.n_candidates": max(config.sampler.n_candidates, 2 * n_tiles)})


@dataclass
class SoftResult:
    proposal: TileProposal  # its attention map is kept only when an overlay was asked for
    level0_dims: tuple[int, int]
    slide_info: SlideInfo  # mpp / objective and where they came from (file, or assumed)
    thumbnail: np.ndarray | None  # kept only when an overlay was asked for
    thumbnail_s: float
    propose_s: float
    stages_ms: dict[str, float]  # open, thumbnail, tissue_mask, soft_attention, sampling (as `score`'s profile)
    # GeoJSON features of the tissue outline and attention regions (level-0 px), only when asked for: they
    # are drawn here, where the mask and map are, so the map need not travel to the ingress.
    region_features: list[dict[str, Any]] | None = None


@dataclass
class TileJob:
    """One request's tiles for the hard-attention stage."""

    tiles: np.ndarray  # (n, S, S, 3) uint8
    proposal: TileProposal  # boxes and attention weights (the attention map is left out: not needed)
    n_glimpses: int
    seed: int  # the request's seed: its tiles' random first glimpses are drawn from it


@dataclass
class HardResult:
    tile_scores: list[TileScore]
    batch_tiles: int  # tiles in the agent batch that scored this request's tiles (with other requests')
    agent_s: float  # wall time of that batch in the agent
    replica_s: float = 0.0  # from the call's arrival in the replica to its answer: agent_s + the batch queue


class _ModelHolder:
    """Loads the pinned model once; remembers why not if it cannot."""

    def __init__(self, model_ref: ModelRef, tracking_uri: str | None, torch_threads: int) -> None:
        torch.set_num_threads(torch_threads)
        one_malloc_arena()  # the replica's scoring threads share one heap (bounded peak RSS)
        self.model_ref = model_ref
        self.model: Any = None
        self.config: DualAttentionConfig | None = None
        self.meta: dict[str, Any] = {}
        self.load_error: str | None = None
        self.device = replica_device()
        try:
            self.model, self.config, self.meta = load_model(model_ref, tracking_uri)
            self.model.to(self.device)
        except ModelLoadError as error:
            self.load_error = str(error)

    def require(self) -> tuple[Any, DualAttentionConfig]:
        if self.model is None or self.config is None:
            raise ModelNotLoaded(f"model not loaded: {self.load_error}")
        return self.model, self.config

    def describe(self) -> dict[str, Any]:
        """Model identity and config for the ingress (raises ``ModelNotLoaded``)."""
        _, config = self.require()
        return {
            "name": self.model_ref.name,
            "version": self.model_ref.version,
            "alias": self.model_ref.alias,
            "uri": self.model_ref.public_uri,  # a checkpoint path is named, not shown
            "config": config.to_dict(),
            "config_digest": config.digest(),
        }


@serve.deployment(
    ray_actor_options={"num_cpus": 0.5},
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2},
    max_ongoing_requests=4,
)
class SoftAttentionStage:
    def __init__(self, model_ref: ModelRef, tracking_uri: str | None = None, torch_threads: int = 1,
                 max_open_slides: int = 8, limits: SlideLimits | None = None) -> None:
        self.holder = _ModelHolder(model_ref, tracking_uri, torch_threads)
        self.slides = SlideHandleCache(max_open_slides)
        self.limits = limits

    def describe(self) -> dict[str, Any]:
        return self.holder.describe()

    def propose(self, slide_path: str, n_tiles: int | None, seed: int, keep_thumbnail: bool = False,
                cache_handle: bool = True, outlines: bool = False) -> SoftResult:
        """Raises ``SlideError`` (unreadable slide), ``SlideTooLarge``, ``ScoringError`` (smaller than a
        tile), ``NoTissue`` or ``ModelNotLoaded``."""
        model, config = self.holder.require()
        config = request_config(config, n_tiles)
        timer = StageTimer()
        start = time.perf_counter()
        if cache_handle:
            with timer.stage("open"):
                slide = self.slides.get(slide_path)
            view, info = self._view(slide, config, timer)
        else:  # an upload: its file goes away after the request, so do not keep its handle
            with timer.stage("open"):
                slide = open_slide(slide_path)
            with slide:
                view, info = self._view(slide, config, timer)
        thumbnail, mask, level0_dims = view.thumbnail, view.tissue_mask, view.level0_dims
        thumbnail_s = time.perf_counter() - start
        if not mask.any():
            raise NoTissue(f"no tissue found on the slide's thumbnail (1/{config.slide.thumbnail_downsample} "
                           "of level 0): nothing to score")
        start = time.perf_counter()
        proposal = propose_tiles(model, thumbnail, mask, level0_dims, config, seed, timer=timer)
        propose_s = time.perf_counter() - start
        if not proposal.level0_boxes:
            raise NoTissue(f"no tiles to score: {proposal.shortfall_reason}")
        regions = None
        if outlines:
            regions = region_features(mask, proposal.attention_map, config.slide.thumbnail_downsample, level0_dims)
        if not keep_thumbnail:
            # Only an overlay needs the map; for a 40x slide it is ~3000² float64, tens of MB per answer.
            proposal = dataclasses.replace(proposal, attention_map=np.zeros((0, 0)))
        return SoftResult(proposal=proposal, level0_dims=level0_dims, slide_info=info,
                          thumbnail=thumbnail if keep_thumbnail else None,
                          thumbnail_s=thumbnail_s, propose_s=propose_s, stages_ms=dict(timer.ms),
                          region_features=regions)

    def _view(self, slide: Slide, config: DualAttentionConfig, timer: StageTimer) -> tuple[SlideView, SlideInfo]:
        # Refused on the header alone, before any pixel is decoded: a small file must not stall the replica.
        if self.limits is not None:
            self.limits.check(slide, config.slide.thumbnail_downsample)
        try:
            view = slide_view(slide, config.slide.thumbnail_downsample, config.slide.tissue_min_area_thumb_px, timer)
        except Exception:
            self.slides.evict(slide.path)  # a failed read may leave the handle unusable
            raise
        # After the read (cheap for a slide this small): a corrupt file is reported as corrupt first.
        check_slide_fits_a_tile(slide.dimensions, config.tile.tile_level0_px)
        return view, slide.info


# How long a batch waits for more requests after its first: none. Requests that arrive while the agent
# runs queue and form the next batch anyway, so waiting only delays a lone request: 5 ms here cost every
# sequential request 5 ms (bench_serve.py, "Serving overhead" in RESULTS.md).
HARD_BATCH_WAIT_S = 0.0


def _tiles_in(jobs: list[TileJob]) -> int:
    return sum(len(job.tiles) for job in jobs)


@serve.deployment(
    ray_actor_options={"num_cpus": 0.5},
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4},
    max_ongoing_requests=16,
)
class HardAttentionStage:
    def __init__(self, model_ref: ModelRef, tracking_uri: str | None = None, torch_threads: int = 1,
                 batch_wait_timeout_s: float = HARD_BATCH_WAIT_S) -> None:
        self.holder = _ModelHolder(model_ref, tracking_uri, torch_threads)
        self._score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def describe(self) -> dict[str, Any]:
        return self.holder.describe()

    async def score(self, job: TileJob) -> HardResult:
        self.holder.require()
        arrived = time.perf_counter()
        result = await self._score_batch(job)
        return dataclasses.replace(result, replica_s=time.perf_counter() - arrived)

    @serve.batch(max_batch_size=MAX_BATCH_TILES, batch_wait_timeout_s=HARD_BATCH_WAIT_S, batch_size_fn=_tiles_in)
    async def _score_batch(self, jobs: list[TileJob]) -> list[HardResult]:
        # Tiles of all waiting requests go through the agent together; requests asking for different
        # T run as separate groups.
        results: list[HardResult | None] = [None] * len(jobs)
        groups: dict[int, list[int]] = {}
        for index, job in enumerate(jobs):
            groups.setdefault(job.n_glimpses, []).append(index)
        for n_glimpses, indices in groups.items():
            group = [jobs[i] for i in indices]
            start_s = time.perf_counter()
            scores = await asyncio.to_thread(self._score_group, group, n_glimpses)
            agent_s = time.perf_counter() - start_s
            start = 0
            for i, job in zip(indices, group, strict=True):
                results[i] = HardResult(scores[start:start + len(job.tiles)], batch_tiles=len(scores),
                                        agent_s=agent_s)
                start += len(job.tiles)
        return results  # type: ignore[return-value]

    def _score_group(self, jobs: list[TileJob], n_glimpses: int) -> list[TileScore]:
        model, config = self.holder.require()
        merged = TileProposal(
            level0_boxes=[box for job in jobs for box in job.proposal.level0_boxes],
            attention_weights=np.concatenate([job.proposal.attention_weights for job in jobs]),
            attention_map=np.zeros((0, 0)),
            centers_thumb_rc=np.concatenate([job.proposal.centers_thumb_rc for job in jobs]),
            shortfall_reason=None,
        )
        tiles = np.concatenate([job.tiles for job in jobs])
        # each request's first glimpses from its own seed, as in-process scoring draws them
        first_locations = torch.cat([first_glimpse_locations(model.agent, len(job.tiles), job.seed) for job in jobs])
        scoring_model = _with_glimpses(model, n_glimpses)  # on the replica's device: the pipeline moves tensors
        return score_tiles(scoring_model, tiles, merged, config, seed=0, first_locations=first_locations)


def _with_glimpses(model: Any, n_glimpses: int) -> Any:
    """The model, or a view of it whose agent takes ``n_glimpses`` glimpses per tile.

    The agent's weights do not depend on T (it is recurrent), only its loop count does. A shallow copy
    shares every parameter and submodule and changes only that count, so concurrent requests with other
    T are unaffected. ``score_tiles`` uses only ``model.agent``.
    """
    if n_glimpses == model.agent.n_glimpses:
        return model
    agent = copy.copy(model.agent)
    agent.n_glimpses = n_glimpses
    return types.SimpleNamespace(agent=agent)


# -- GPUs ------------------------------------------------------------------------------------------------


def replica_device() -> torch.device:
    """CUDA when this replica was given a GPU (``ray_actor_options: {num_gpus: ...}``) and torch sees one."""
    import ray

    if torch.cuda.is_available() and ray.is_initialized() and ray.get_gpu_ids():
        return torch.device("cuda")
    return torch.device("cpu")


