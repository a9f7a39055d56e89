"""The Serve application: HTTP ingress -> soft-attention stage -> tile plane -> hard-attention stage.

Run it with any of:

    serve run serve.app:build_app model=runs/ckpt slide_root=/data/slides        # development
    serve deploy serve/config.yaml                                                # a running cluster
    dual-attention serve --model models:/dual-attention-her2@candidate --slide-root /data/slides  # local, 127.0.0.1

``build_app(args)`` reads ``ServeSettings`` (environment, then ``args``), pins a registry alias to its
current version, and binds the three deployments. The ingress holds the tile pool (reader actors of
``jobs.runtime.tile_plane``); recent overlays (PNG) and GeoJSON annotations are files in the work folder
(``serve.overlay_store``), so any ingress replica can answer for them and the ingress runs several
replicas. The two model stages scale on their own.

Each scoring request has a deadline (``request_deadline_s``): it bounds the wait on every stage and is
checked between them, so a request never waits on a stuck stage past it (HTTP 504). A model-stage call
whose replica dies under it (``kill -9``, a crash) is sent once more: the stages are idempotent, and the
other replica, or the replacement Serve starts, answers it (``benchmarks/bench_serve_resilience.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from dual_attention.annotations import dumps, feature_collection, slide_properties, tile_features
from dual_attention.config import DualAttentionConfig
from dual_attention.pipeline import aggregate, slide_score_record
from dual_attention.slides import calibration_dict
from jobs.runtime.tile_plane import TilePool
from serve.http_api import create_http_app, root_cause
from serve.model_source import ModelLoadError, ModelRef, pin_model_uri
from serve.overlay_store import OverlayStore
from serve.redact import redact_paths
from serve.schemas import (
    HealthResponse,
    ModelInfo,
    ScoreResponse,
    ServingProfile,
    SlideCalibration,
    StageTimings,
)
from serve.settings import ServeSettings
from serve.stages import (
    HARD_BATCH_WAIT_S,
    DeadlineExceeded,
    HardAttentionStage,
    HardResult,
    ModelNotLoaded,
    SlideLimits,
    SoftAttentionStage,
    SoftResult,
    TileJob,
)

T = TypeVar("T")

logger = logging.getLogger("ray.serve")


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, num_replicas=2, max_ongoing_requests=64)
@serve.ingress()
class ScoringIngress:
    def __init__(self, soft: DeploymentHandle, hard: DeploymentHandle, settings: ServeSettings) -> None:
        self.soft = soft
        self.hard = hard
        self.settings = settings
        self.overlays = OverlayStore(settings.overlay_dir, settings.overlay_cache_size)
        self.geojsons = OverlayStore(settings.overlay_dir, settings.overlay_cache_size, suffix=".geojson")
        self._tile_pool: TilePool | None = None  # started on the first scoring request
        self._tile_pool_lock = threading.Lock()
        self._described: dict[str, Any] | None = None
        self._model: tuple[ModelInfo, DualAttentionConfig] | None = None  # built once from _described

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
        return (await self._served_model())[0]

    async def _served_model(self) -> tuple[ModelInfo, DualAttentionConfig]:
        if self._model is None:
            described = await self._describe()
            config = DualAttentionConfig.from_dict(described["config"])
            info = ModelInfo(name=described["name"], version=described["version"], alias=described["alias"],
                             uri=described["uri"], task=config.task, class_names=list(config.class_names),
                             config_digest=described["config_digest"], preset=config.preset)
            self._model = (info, config)
        return self._model

    async def health(self) -> HealthResponse:
        try:
            await asyncio.wait_for(self._describe(), timeout=self.settings.request_deadline_s)
        except Exception as error:  # ModelNotLoaded, or the stage not reachable (dead replica, timeout)
            cause = root_cause(error)
            not_loaded = isinstance(cause, ModelNotLoaded | ModelLoadError)
            # /v1/healthz needs no token: its detail must not show server paths.
            detail = redact_paths(str(cause), {self.settings.slide_root: ""}) if not_loaded \
                else f"scoring backend unavailable ({type(cause).__name__})"
            return HealthResponse(status="model not loaded" if not_loaded else "unavailable", model_loaded=False,
                                  detail=detail)
        return HealthResponse(status="ok", model_loaded=True)

    async def _stage(self, awaitable: Awaitable[T], stage: str, deadline: float) -> T:
        """``awaitable`` within what is left of the request's deadline (``time.perf_counter()`` clock)."""
        remaining_s = deadline - time.perf_counter()
        limit_s = self.settings.request_deadline_s
        if remaining_s <= 0:
            if asyncio.iscoroutine(awaitable):
                awaitable.close()  # never started
            elif hasattr(awaitable, "cancel"):
                awaitable.cancel()  # a DeploymentResponse: the call was sent; Serve cancels it in the replica
            raise DeadlineExceeded(f"request deadline of {limit_s:g} s passed before the {stage} stage")
        try:
            return await asyncio.wait_for(awaitable, timeout=remaining_s)
        except TimeoutError:
            raise DeadlineExceeded(f"request deadline of {limit_s:g} s passed during the {stage} stage") from None

    async def _call_stage(self, call: Callable[[], Awaitable[T]], stage: str, deadline: float) -> T:
        """``call()`` through ``_stage``, and once more if the replica that took it died (a
        ``RayActorError``: killed, crashed or unreachable). The stage calls are idempotent (their result
        is a function of their arguments), and Serve's router sends the second call to a live replica, or
        holds it until the replacement is up; a second death, or any other error, is raised (a dead
        replica answers 503)."""
        try:
            return await self._stage(call(), stage, deadline)
        except Exception as error:
            if not isinstance(root_cause(error), RayActorError):
                raise
            logger.warning("the %s replica died during a call (%s); calling again", stage, type(error).__name__)
        return await self._stage(call(), stage, deadline)

    # -- scoring ---------------------------------------------------------------------------------------
    async def score(self, slide_path: Path, slide_name: str, n_tiles: int | None, n_glimpses: int | None,
                    seed: int, overlay: bool, is_upload: bool, received_at: float, geojson: bool = False
                    ) -> ScoreResponse:
        """``received_at``: ``time.perf_counter()`` when the route started (before path checks or the
        upload), so ``validate_s`` and ``total_s`` include them."""
        validate_s = time.perf_counter() - received_at
        deadline = received_at + self.settings.request_deadline_s
        info, config = await self._call_stage(self._served_model, "model", deadline)
        n_glimpses = n_glimpses or config.agent.n_glimpses

        start = time.perf_counter()
        soft: SoftResult = await self._call_stage(
            lambda: self.soft.propose.remote(str(slide_path), n_tiles, seed, keep_thumbnail=overlay,
                                             cache_handle=not is_upload, outlines=geojson),
            "soft-attention", deadline)
        soft_s = time.perf_counter() - start

        start = time.perf_counter()
        tiles = await self._stage(asyncio.to_thread(self._read_tiles, str(slide_path), config.tile.tile_level0_px,
                                                    soft.proposal.level0_boxes), "tile-read", deadline)
        tile_read_s = time.perf_counter() - start

        start = time.perf_counter()
        # The hard stage needs boxes and weights, not the attention map.
        light_proposal = dataclasses.replace(soft.proposal, attention_map=np.zeros((0, 0)))
        job = TileJob(tiles, light_proposal, n_glimpses, seed)
        hard: HardResult = await self._call_stage(lambda: self.hard.score.remote(job), "hard-attention", deadline)
        tile_scores = hard.tile_scores
        hard_s = time.perf_counter() - start

        start = time.perf_counter()
        slide_score = aggregate(tile_scores, config.task, soft.level0_dims, attention_map=soft.proposal.attention_map)
        score_id = uuid.uuid4().hex
        aggregate_s = time.perf_counter() - start
        overlay_url = None
        start = time.perf_counter()
        if overlay and soft.thumbnail is not None:
            from dual_attention.overlays import overlay_png_bytes  # matplotlib: imported on first use only

            # Rendered now and stored on disk: the GET may reach another ingress replica. The insets are the
            # tiles just read (level 0), scaled down.
            png = await self._stage(asyncio.to_thread(
                overlay_png_bytes, soft.thumbnail, slide_score, config.slide.thumbnail_downsample,
                f"{slide_name}: {slide_score.predicted_label} ({slide_score.confidence:.2f})", config.class_names,
                list(tiles), config.agent.glimpse_px), "overlay", deadline)
            await asyncio.to_thread(self.overlays.put, score_id, png)
            overlay_url = f"/v1/overlay/{score_id}"
        overlay_s = time.perf_counter() - start
        slide_info = soft.slide_info
        geojson_url = None
        start = time.perf_counter()
        if geojson and soft.region_features is not None:
            features = soft.region_features + tile_features(slide_score.tiles, config.class_names,
                                                            config.agent.glimpse_px)
            collection = feature_collection(features, slide_properties(
                slide_score, config.class_names, slide=slide_name, score_id=score_id,
                model={"name": info.name, "version": info.version}))
            # Stored like the overlay: the GET may reach another ingress replica.
            await asyncio.to_thread(self.geojsons.put, score_id, dumps(collection).encode())
            geojson_url = f"/v1/score/{score_id}/geojson"
        geojson_s = time.perf_counter() - start
        total_s = time.perf_counter() - received_at
        soft_work_s = soft.thumbnail_s + soft.propose_s
        stages_ms = {**soft.stages_ms, "tile_reads": tile_read_s * 1e3, "agent": hard.agent_s * 1e3,
                     "aggregation": aggregate_s * 1e3}
        if overlay_url is not None:
            stages_ms["overlay"] = overlay_s * 1e3
        if geojson_url is not None:
            stages_ms["geojson"] = geojson_s * 1e3
        serving_ms = {"validate": validate_s * 1e3, "soft_call": (soft_s - soft_work_s) * 1e3,
                      "hard_call": (hard_s - hard.replica_s) * 1e3, "agent_queue": (hard.replica_s - hard.agent_s) * 1e3,
                      "ingress": (total_s - validate_s - soft_s - tile_read_s - hard_s - aggregate_s - overlay_s
                                 - geojson_s) * 1e3}

        return ScoreResponse(
            score_id=score_id,
            slide=slide_name,
            **slide_score_record(slide_score, config.class_names),
            shortfall_reason=soft.proposal.shortfall_reason,
            level0_dimensions=soft.level0_dims,
            calibration=SlideCalibration(**calibration_dict(slide_info)),
            n_tiles=n_tiles or config.sampler.n_tiles,
            n_glimpses=n_glimpses,
            seed=seed,
            model=info,
            timings=StageTimings(validate_s=validate_s, soft_attention_s=soft_s, thumbnail_s=soft.thumbnail_s,
                                 soft_attention_compute_s=soft_work_s,
                                 tile_read_s=tile_read_s, hard_attention_s=hard_s, hard_attention_compute_s=hard.agent_s,
                                 agent_batch_tiles=hard.batch_tiles, aggregate_s=aggregate_s, overlay_s=overlay_s,
                                 geojson_s=geojson_s, total_s=total_s),
            profile=ServingProfile(stages_ms={k: round(v, 3) for k, v in stages_ms.items()},
                                   serving_ms={k: round(v, 3) for k, v in serving_ms.items()},
                                   total_ms=round(total_s * 1e3, 3)),
            overlay_url=overlay_url,
            geojson_url=geojson_url,
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
        return await asyncio.to_thread(self.overlays.get, score_id)

    async def geojson_bytes(self, score_id: str) -> bytes | None:
        return await asyncio.to_thread(self.geojsons.get, score_id)


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The application builder for ``serve run serve.app:build_app key=value ...`` and the config YAML.

    ``args`` override the environment by ``ServeSettings`` field name (``model``, ``slide_root``,
    ``max_upload_mb``, ...). Serve-only keys: ``torch_threads`` (per model replica, default 1);
    ``soft_replicas`` / ``hard_replicas`` (a fixed replica count instead of autoscaling); ``ingress_replicas``
    (default: the deployment's, 2);
    ``gpus_per_replica`` (e.g. 0.5: the model stages run on the GPU; default 0, CPU only);
    ``hard_batch_wait_s`` (how long the agent's batch waits for more requests after its first, default
    ``serve.stages.HARD_BATCH_WAIT_S``); and
    ``model_revision`` (ignored here: changing it makes ``serve deploy`` rebuild the app, which re-pins a
    moved alias)."""
    args = dict(args or {})
    torch_threads = int(args.pop("torch_threads", 1))
    soft_replicas, hard_replicas = args.pop("soft_replicas", None), args.pop("hard_replicas", None)
    ingress_replicas = args.pop("ingress_replicas", None)
    gpus = float(args.pop("gpus_per_replica", 0))
    hard_batch_wait_s = float(args.pop("hard_batch_wait_s", HARD_BATCH_WAIT_S))
    args.pop("model_revision", None)
    if "model" in args:
        args["model_uri"] = args.pop("model")
    settings = ServeSettings.from_env(args)
    try:
        model_ref = pin_model_uri(settings.model_uri, settings.tracking_uri)
    except ModelLoadError as error:
        # Deploy anyway: the service comes up and answers 503 naming the cause (and healthz says so).
        name = settings.model_uri if settings.model_uri.startswith("models:/") else Path(settings.model_uri).name
        model_ref = ModelRef(uri=settings.model_uri, name=name, version=None, alias=None, error=str(error))
    limits = SlideLimits(max_level0_pixels=settings.max_level0_pixels,
                         max_thumbnail_decode_bytes=settings.max_thumbnail_decode_bytes)
    soft = _fixed(SoftAttentionStage, soft_replicas, gpus).bind(model_ref, settings.tracking_uri, torch_threads,
                                                                limits=limits)
    hard = _fixed(HardAttentionStage, hard_replicas, gpus).bind(model_ref, settings.tracking_uri, torch_threads,
                                                                batch_wait_timeout_s=hard_batch_wait_s)
    ingress = ScoringIngress if ingress_replicas is None else ScoringIngress.options(num_replicas=int(ingress_replicas))
    return ingress.bind(soft, hard, settings)


def _fixed(deployment: serve.Deployment, replicas: int | str | None, gpus: float) -> serve.Deployment:
    """The deployment with autoscaling, or with exactly ``replicas`` replicas; ``gpus`` per replica."""
    if gpus > 0:
        deployment = deployment.options(ray_actor_options={**deployment.ray_actor_options, "num_gpus": gpus})
    if replicas is None:
        return deployment
    return deployment.options(num_replicas=int(replicas), autoscaling_config=None)


__all__ = ["ModelNotLoaded", "ScoringIngress", "build_app"]
