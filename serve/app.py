"""The Serve application: HTTP ingress -> soft-attention stage -> tile plane -> hard-attention stage.

Run it with any of:

    serve run serve.app:build_app model=runs/ckpt slide_root=/data/slides        # development
    serve deploy serve/config.yaml                                                # a running cluster
    dual-attention serve --model models:/her2@champion --slide-root /data/slides  # local, 127.0.0.1

``build_app(args)`` reads ``ServeSettings`` (environment, then ``args``), pins a registry alias to its
current version, and binds the three deployments. The ingress holds the tile pool (reader actors of
``jobs.tile_plane``) and a bounded LRU of recent overlays; it runs one replica so that an overlay URL
always reaches the replica that holds it. The two model stages scale on their own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from dual_attention.config import DualAttentionConfig
from dual_attention.pipeline import SlideScore, aggregate
from jobs.tile_plane import TilePool
from serve.http_api import create_http_app
from serve.model_source import ModelLoadError, ModelRef, pin_model_uri
from serve.schemas import (
    HealthResponse,
    Level0BoxOut,
    ModelInfo,
    ScoreResponse,
    StageTimings,
    TileOut,
)
from serve.settings import ServeSettings
from serve.stages import (
    HardAttentionStage,
    HardResult,
    ModelNotLoaded,
    SoftAttentionStage,
    SoftResult,
    TileJob,
)


@dataclass
class _OverlayInputs:
    thumbnail: np.ndarray
    slide_score: SlideScore
    downsample: int
    title: str
    class_names: tuple[str, ...]
    png: bytes | None = None  # rendered on first GET


class OverlayCache:
    """A bounded LRU of the inputs of recent overlays; each PNG is rendered once, on first request."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, _OverlayInputs] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, score_id: str, inputs: _OverlayInputs) -> None:
        with self._lock:
            self._items[score_id] = inputs
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, score_id: str) -> _OverlayInputs | None:
        with self._lock:
            inputs = self._items.get(score_id)
            if inputs is not None:
                self._items.move_to_end(score_id)
            return inputs


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, num_replicas=1, max_ongoing_requests=64)
@serve.ingress()
class ScoringIngress:
    def __init__(self, soft: DeploymentHandle, hard: DeploymentHandle, settings: ServeSettings) -> None:
        self.soft = soft
        self.hard = hard
        self.settings = settings
        self.overlays = OverlayCache(settings.overlay_cache_size)
        self._tile_pool: TilePool | None = None  # started on the first scoring request
        self._tile_pool_lock = threading.Lock()
        self._described: dict[str, Any] | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_http_app(self, self.settings)

    def __del__(self) -> None:
        pool = getattr(self, "_tile_pool", None)
        if pool is not None:
            pool.shutdown()

    def tile_pool(self) -> TilePool:
        """The reader actors, started on first use: a service whose model failed to load never needs them."""
        with self._tile_pool_lock:
            if self._tile_pool is None:
                self._tile_pool = TilePool(num_actors=self.settings.tile_readers, actor_num_cpus=0.25)
            return self._tile_pool

    # -- the model -------------------------------------------------------------------------------------
    async def _describe(self) -> dict[str, Any]:
        """The served model's identity and config, asked of the soft stage once (raises ModelNotLoaded)."""
        if self._described is None:
            self._described = await self.soft.describe.remote()
        return self._described

    async def model_info(self) -> ModelInfo:
        described = await self._describe()
        config = DualAttentionConfig.from_dict(described["config"])
        return ModelInfo(name=described["name"], version=described["version"], alias=described["alias"],
                         uri=described["uri"], task=config.task, class_names=list(config.class_names),
                         config_digest=described["config_digest"], preset=config.preset)

    async def health(self) -> HealthResponse:
        try:
            await self._describe()
        except Exception as error:  # ModelNotLoaded, or the stage not reachable
            cause = getattr(error, "cause", None) or error
            return HealthResponse(status="model not loaded", model_loaded=False, detail=str(cause))
        return HealthResponse(status="ok", model_loaded=True)

    # -- scoring ---------------------------------------------------------------------------------------
    async def score(self, slide_path: Path, slide_name: str, n_tiles: int | None, n_glimpses: int | None,
                    seed: int, overlay: bool, is_upload: bool, received_at: float) -> ScoreResponse:
        """``received_at``: ``time.perf_counter()`` when the route started (before path checks or the
        upload), so ``validate_s`` and ``total_s`` include them."""
        validate_s = time.perf_counter() - received_at
        info = await self.model_info()
        config = DualAttentionConfig.from_dict((await self._describe())["config"])
        n_glimpses = n_glimpses or config.agent.n_glimpses

        start = time.perf_counter()
        soft: SoftResult = await self.soft.propose.remote(str(slide_path), n_tiles, seed, keep_thumbnail=overlay,
                                                          cache_handle=not is_upload)
        soft_s = time.perf_counter() - start

        start = time.perf_counter()
        tiles = await asyncio.to_thread(self._read_tiles, str(slide_path), config.tile.tile_level0_px,
                                        soft.proposal.level0_boxes)
        tile_read_s = time.perf_counter() - start

        start = time.perf_counter()
        # The hard stage needs boxes and weights, not the attention map.
        light_proposal = dataclasses.replace(soft.proposal, attention_map=np.zeros((0, 0)))
        hard: HardResult = await self.hard.score.remote(TileJob(tiles, light_proposal, n_glimpses, seed))
        tile_scores = hard.tile_scores
        hard_s = time.perf_counter() - start

        start = time.perf_counter()
        slide_score = aggregate(tile_scores, config.task, soft.level0_dims, attention_map=soft.proposal.attention_map)
        score_id = uuid.uuid4().hex
        overlay_url = None
        if overlay and soft.thumbnail is not None:
            self.overlays.put(score_id, _OverlayInputs(
                thumbnail=soft.thumbnail, slide_score=slide_score, downsample=config.slide.thumbnail_downsample,
                title=f"{slide_name}: {slide_score.predicted_label} ({slide_score.confidence:.2f})",
                class_names=config.class_names))
            overlay_url = f"/v1/overlay/{score_id}"
        aggregate_s = time.perf_counter() - start

        return ScoreResponse(
            score_id=score_id,
            slide=slide_name,
            predicted_class=slide_score.predicted_class,
            predicted_label=slide_score.predicted_label,
            class_probabilities=slide_score.class_probabilities,
            confidence=slide_score.confidence,
            tiles=[TileOut(level0_box=Level0BoxOut(**vars(t.level0_box)), attention_weight=t.attention_weight,
                           predicted_class=t.predicted_class, predicted_label=config.class_names[t.predicted_class],
                           class_probabilities=t.class_probabilities, glimpse_trail_level0=t.glimpse_trail_level0)
                   for t in slide_score.tiles],
            shortfall_reason=soft.proposal.shortfall_reason,
            level0_dimensions=soft.level0_dims,
            level0_pixels_read=slide_score.level0_pixels_read,
            fraction_level0_read=slide_score.fraction_level0_read,
            n_tiles=n_tiles or config.sampler.n_tiles,
            n_glimpses=n_glimpses,
            seed=seed,
            model=info,
            timings=StageTimings(validate_s=validate_s, soft_attention_s=soft_s, thumbnail_s=soft.thumbnail_s,
                                 soft_attention_compute_s=soft.thumbnail_s + soft.propose_s,
                                 tile_read_s=tile_read_s, hard_attention_s=hard_s, hard_attention_compute_s=hard.agent_s,
                                 agent_batch_tiles=hard.batch_tiles, aggregate_s=aggregate_s,
                                 total_s=time.perf_counter() - received_at),
            overlay_url=overlay_url,
        )

    def _read_tiles(self, slide_path: str, tile_level0_px: int, boxes: list) -> np.ndarray:
        pool = self.tile_pool()
        try:
            return pool.read_tiles_fn(slide_path, tile_level0_px)(boxes)
        finally:
            # The response reports pixels read from the boxes; the pool's per-slide counter would only
            # grow with every uploaded (uniquely named) slide.
            pool.reset_pixel_counts(slide_path)

    async def overlay_png(self, score_id: str) -> bytes | None:
        inputs = self.overlays.get(score_id)
        if inputs is None:
            return None
        if inputs.png is None:
            from jobs.overlays import overlay_png_bytes  # matplotlib: imported on first use only

            inputs.png = await asyncio.to_thread(overlay_png_bytes, inputs.thumbnail, inputs.slide_score,
                                                 inputs.downsample, inputs.title, inputs.class_names)
        return inputs.png


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The application builder for ``serve run serve.app:build_app key=value ...`` and the config YAML.

    ``args`` override the environment by ``ServeSettings`` field name (``model``, ``slide_root``,
    ``max_upload_mb``, ...). Serve-only keys: ``torch_threads`` (per model replica, default 1);
    ``soft_replicas`` / ``hard_replicas`` (a fixed replica count instead of autoscaling);
    ``gpus_per_replica`` (e.g. 0.5: the model stages run on the GPU; default 0, CPU only); and
    ``model_revision`` (ignored here: changing it makes ``serve deploy`` rebuild the app, which re-pins a
    moved alias)."""
    args = dict(args or {})
    torch_threads = int(args.pop("torch_threads", 1))
    soft_replicas, hard_replicas = args.pop("soft_replicas", None), args.pop("hard_replicas", None)
    gpus = float(args.pop("gpus_per_replica", 0))
    args.pop("model_revision", None)
    if "model" in args:
        args["model_uri"] = args.pop("model")
    settings = ServeSettings.from_env(args)
    try:
        model_ref = pin_model_uri(settings.model_uri, settings.tracking_uri)
    except ModelLoadError as error:
        # Deploy anyway: the service comes up and answers 503 naming the cause (and healthz says so).
        model_ref = ModelRef(uri=settings.model_uri, name=settings.model_uri, version=None, alias=None,
                             error=str(error))
    soft = _fixed(SoftAttentionStage, soft_replicas, gpus).bind(model_ref, settings.tracking_uri, torch_threads)
    hard = _fixed(HardAttentionStage, hard_replicas, gpus).bind(model_ref, settings.tracking_uri, torch_threads)
    return ScoringIngress.bind(soft, hard, settings)


def _fixed(deployment: serve.Deployment, replicas: int | str | None, gpus: float) -> serve.Deployment:
    """The deployment with autoscaling, or with exactly ``replicas`` replicas; ``gpus`` per replica."""
    if gpus > 0:
        deployment = deployment.options(ray_actor_options={**deployment.ray_actor_options, "num_gpus": gpus})
    if replicas is None:
        return deployment
    return deployment.options(num_replicas=int(replicas), autoscaling_config=None)


__all__ = ["ModelNotLoaded", "ScoringIngress", "build_app"]
