"""The HTTP API: FastAPI routes, bearer-token check and the mapping of errors to status codes.

The app is built per ingress replica by ``create_http_app(service, settings)``; ``service`` does the
work (``serve.app.ScoringIngress``). Routes:

- ``GET  /v1/healthz``            liveness/readiness, never needs the token (503 while no model is loaded)
- ``GET  /v1/model``              name, version, alias, config digest of the served model
- ``POST /v1/score``              score a slide named relative to the slide root (JSON body)
- ``POST /v1/score/upload``       score an uploaded slide (multipart, part ``file``)
- ``GET  /v1/overlay/{score_id}`` PNG of a recent score asked for with ``?overlay=true``
- ``GET  /v1/score/{score_id}/geojson`` GeoJSON (QuPath) of a recent score asked for with ``?geojson=true``

Errors answer ``{"detail": message}``: 401 missing/wrong token, 403 path outside the slide root,
404 unknown slide, overlay or GeoJSON, 413 upload too large or slide over the server's size limits, 422 malformed
request, unsupported or corrupt slide, slide smaller than a tile, or no tissue, 503 (with ``Retry-After``)
model not loaded or a backend failure (a replica or tile reader died, Serve back-pressure, a timeout),
504 the request's deadline passed, 500 anything unexpected (logged; the service keeps serving).
Messages never show server paths: slides are named as the client named them, files relative to the slide
root, models by name and version (``serve.redact``); the full text goes to the server's log.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from ray.exceptions import RayError, RayTaskError
from ray.serve.exceptions import BackPressureError, RayServeException

from dual_attention.pipeline import ScoringError
from dual_attention.slides import SlideError
from jobs.runtime.tile_plane import TilePoolError
from serve.model_source import ModelLoadError
from serve.paths import PathOutsideRoot, SlideNotFound, resolve_slide_path
from serve.proxy_retry import RETRY_AFTER_S
from serve.redact import redact_paths
from serve.schemas import ErrorResponse, HealthResponse, ModelInfo, ScoreRequest, ScoreResponse
from serve.settings import ServeSettings
from serve.stages import DeadlineExceeded, ModelNotLoaded, NoTissue, SlideTooLarge
from serve.uploads import UploadError, UploadTooLarge, slide_upload

logger = logging.getLogger("ray.serve")

HEALTH_PATH = "/v1/healthz"
GEOJSON_MEDIA_TYPE = "application/geo+json"  # RFC 7946
GEOJSON_QUERY_HELP = ("keep a QuPath-importable GeoJSON (tissue, attention, tiles, glimpses in level-0 px), "
                      "linked as geojson_url")


class ScoringService(Protocol):
    """What the routes need from the ingress deployment."""

    async def score(self, slide_path: Path, slide_name: str, n_tiles: int | None, n_glimpses: int | None,
                    seed: int, overlay: bool, is_upload: bool, received_at: float, geojson: bool = False
                    ) -> ScoreResponse: ...

    async def model_info(self) -> ModelInfo: ...

    async def health(self) -> HealthResponse: ...

    async def overlay_png(self, score_id: str) -> bytes | None: ...

    async def geojson_bytes(self, score_id: str) -> bytes | None: ...


class ParameterError(ValueError):
    """A request parameter is out of the server's bounds (HTTP 422)."""


def root_cause(error: BaseException) -> BaseException:
    """The exception raised in a replica, when it comes back wrapped by Ray (possibly more than once:
    ingress -> stage -> tile reader)."""
    for _ in range(8):  # wrapping depth is the call depth; bounded in case of a cycle
        cause = getattr(error, "cause", None) if isinstance(error, RayTaskError) else None
        if not isinstance(cause, BaseException):
            return error
        error = cause
    return error


# Exception type -> HTTP status, first match wins.
_STATUS: list[tuple[type[BaseException], int]] = [
    (PathOutsideRoot, 403),
    (SlideNotFound, 404),
    (UploadTooLarge, 413),
    (SlideTooLarge, 413),
    (UploadError, 422),
    (ParameterError, 422),
    (SlideError, 422),
    (NoTissue, 422),
    (ScoringError, 422),
    (ModelNotLoaded, 503),
    (ModelLoadError, 503),
    (TilePoolError, 503),
]


def backend_unavailable(cause: BaseException) -> bool:
    """A failure of the serving machinery rather than of the request: a replica or actor that died or
    cannot be reached (``ActorDiedError``, ``RayActorError``, ...), Serve refusing work
    (``BackPressureError``, ``DeploymentUnavailableError``), lost objects, or a timeout. Retrying later
    can succeed, so these answer 503 with ``Retry-After``."""
    if isinstance(cause, RayError) and not isinstance(cause, RayTaskError):
        return True  # RayTaskError is an error raised by our code in a replica: classified by its cause
    return isinstance(cause, RayServeException | TimeoutError)


def error_status(error: BaseException) -> tuple[int, BaseException]:
    """(HTTP status, root cause) of an exception raised while answering."""
    cause = root_cause(error)
    if isinstance(cause, DeadlineExceeded):
        return 504, cause
    for error_type, status in _STATUS:
        if isinstance(cause, error_type):
            return status, cause
    if backend_unavailable(cause):
        return 503, cause
    return 500, cause


def error_response(error: BaseException, slide_name: str | None = None,
                   known_paths: dict[str, str] | None = None) -> JSONResponse:
    """A JSON error answer; a ``SlideError`` is reported under the name the client used, not the
    server-side path. ``known_paths`` (path -> public name) rewrite paths in the message; any other
    absolute path is cut to its last component."""
    status, cause = error_status(error)
    if isinstance(cause, SlideError):
        message = f"slide {slide_name or Path(cause.path).name!r}: {cause.reason}"
    elif isinstance(cause, NoTissue | ScoringError | SlideTooLarge) and slide_name:
        message = f"slide {slide_name!r}: {cause}"
    elif status == 503 and backend_unavailable(cause):
        # Ray's messages describe actors, nodes and stack traces: the server's log keeps them.
        message = f"scoring backend unavailable ({type(cause).__name__}); retry in {RETRY_AFTER_S} s"
    elif status == 500:
        message = f"internal error: {type(cause).__name__}: {cause}"
    else:
        message = str(cause)
    public = redact_paths(message, known_paths)
    if status >= 500:
        logger.error("request failed with %d: %s", status, message, exc_info=cause if status == 500 else None)
    elif public != message:
        logger.info("request refused with %d: %s", status, message)  # the unredacted text, for the operator
    headers = {"Retry-After": str(_retry_after_s(cause))} if status == 503 else None
    return JSONResponse({"detail": public}, status_code=status, headers=headers)


def _retry_after_s(cause: BaseException) -> int:
    if isinstance(cause, BackPressureError) and cause.retry_after_s:
        return max(1, round(cause.retry_after_s))
    return RETRY_AFTER_S


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in [(401, "missing or wrong bearer token"), (403, "slide path outside the slide root"),
                         (404, "no such slide"), (413, "upload too large, or slide over the server's limits"),
                         (422, "malformed request, unsupported, corrupt or too small slide, or no tissue"),
                         (503, "model not loaded or scoring backend unavailable (see Retry-After)"),
                         (504, "the request's deadline passed")]
}


def create_http_app(service: ScoringService, settings: ServeSettings) -> FastAPI:
    # Paths this server knows, as answers may show them: files under the slide root relative to it.
    server_paths = {settings.slide_root: "", settings.work_dir: "<work dir>"}
    if settings.upload_dir:
        server_paths[settings.upload_dir] = "<upload dir>"

    app = FastAPI(
        title="Dual attention IHC scoring",
        version="1",
        description="Scores HER2 / MMR immunohistochemistry whole-slide images with the dual attention model.",
    )

    if settings.api_token:
        expected = settings.api_token.encode()

        @app.middleware("http")
        async def require_bearer_token(request: Request, call_next: Callable[[Request], Awaitable[Response]]
                                       ) -> Response:
            if request.url.path != HEALTH_PATH:
                scheme, _, token = request.headers.get("authorization", "").partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
                    return JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401,
                                        headers={"WWW-Authenticate": "Bearer"})
            return await call_next(request)

    def check_bounds(n_tiles: int | None, n_glimpses: int | None) -> None:
        if n_tiles is not None and n_tiles > settings.max_tiles:
            raise ParameterError(f"n_tiles={n_tiles} exceeds this server's limit of {settings.max_tiles}")
        if n_glimpses is not None and n_glimpses > settings.max_glimpses:
            raise ParameterError(f"n_glimpses={n_glimpses} exceeds this server's limit of {settings.max_glimpses}")

    @app.get(HEALTH_PATH, response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def healthz() -> Response:
        health = await service.health()
        if health.model_loaded:
            return JSONResponse(health.model_dump())
        return JSONResponse(health.model_dump(), status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.get("/v1/model", response_model=ModelInfo, responses=_ERRORS)
    async def model() -> Any:
        try:
            return await service.model_info()
        except Exception as error:
            return error_response(error, known_paths=server_paths)

    @app.post("/v1/score", response_model=ScoreResponse, responses=_ERRORS)
    async def score(body: ScoreRequest,
                    overlay: bool = Query(False, description="keep a PNG overlay, linked as overlay_url"),
                    geojson: bool = Query(False, description=GEOJSON_QUERY_HELP)) -> Any:
        received_at = time.perf_counter()
        try:
            check_bounds(body.n_tiles, body.n_glimpses)
            path = resolve_slide_path(settings.slide_root, body.slide)
            return await service.score(path, body.slide, body.n_tiles, body.n_glimpses, body.seed, overlay,
                                       is_upload=False, received_at=received_at, geojson=geojson)
        except Exception as error:
            return error_response(error, slide_name=body.slide, known_paths=server_paths)

    @app.post(
        "/v1/score/upload",
        response_model=ScoreResponse,
        responses=_ERRORS,
        openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {"file": {"type": "string", "format": "binary",
                                    "description": f"the slide file, at most {settings.max_upload_bytes} bytes"}},
        }}}}},
    )
    async def score_upload(
        request: Request,
        n_tiles: int | None = Query(None, ge=1, description="tiles to sample (N)"),
        n_glimpses: int | None = Query(None, ge=1, description="glimpses per tile (T)"),
        seed: int = Query(0, ge=0, le=2**63 - 1),
        overlay: bool = Query(False, description="keep a PNG overlay, linked as overlay_url"),
        geojson: bool = Query(False, description=GEOJSON_QUERY_HELP),
    ) -> Any:
        received_at = time.perf_counter()
        slide_name = None
        known = dict(server_paths)
        try:
            check_bounds(n_tiles, n_glimpses)
            async with slide_upload(request, settings.upload_dir, settings.max_upload_bytes) as upload:
                slide_name = upload.filename
                known[str(upload.path)] = upload.filename  # the temporary copy, as the client named it
                return await service.score(upload.path, upload.filename, n_tiles, n_glimpses, seed, overlay,
                                           is_upload=True, received_at=received_at, geojson=geojson)
        except Exception as error:
            return error_response(error, slide_name=slide_name, known_paths=known)

    @app.get("/v1/overlay/{score_id}", response_class=Response,
             responses={200: {"content": {"image/png": {}}}, 404: {"model": ErrorResponse}})
    async def overlay(score_id: str) -> Response:
        try:
            png = await service.overlay_png(score_id)
        except Exception as error:
            return error_response(error, known_paths=server_paths)
        if png is None:
            return JSONResponse({"detail": f"no overlay {score_id!r}: unknown, expired from the cache of "
                                           f"{settings.overlay_cache_size} most recent, or not asked for (overlay=true)"},
                                status_code=404)
        return Response(png, media_type="image/png")

    @app.get("/v1/score/{score_id}/geojson", response_class=Response,
             responses={200: {"content": {GEOJSON_MEDIA_TYPE: {}}}, 404: {"model": ErrorResponse}})
    async def score_geojson(score_id: str) -> Response:
        try:
            text = await service.geojson_bytes(score_id)
        except Exception as error:
            return error_response(error, known_paths=server_paths)
        if text is None:
            return JSONResponse({"detail": f"no GeoJSON for score {score_id!r}: unknown, expired from the cache of "
                                           f"{settings.overlay_cache_size} most recent, or not asked for (geojson=true)"},
                                status_code=404)
        return Response(text, media_type=GEOJSON_MEDIA_TYPE)

    return app
