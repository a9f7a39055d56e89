"""Serving settings: from the environment, overridden by the Serve application's ``args``.

Environment variables (all optional except the model):

- ``DUAL_ATTENTION_MODEL``: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a checkpoint path.
- ``DUAL_ATTENTION_SLIDE_ROOT``: slides are named by a path relative to this folder (default: cwd).
- ``DUAL_ATTENTION_API_TOKEN``: when set, every route but ``/v1/healthz`` needs ``Authorization: Bearer``.
- ``DUAL_ATTENTION_MAX_UPLOAD_MB``: largest accepted upload (default 512 MiB).
- ``DUAL_ATTENTION_UPLOAD_DIR``: where uploads are streamed (default: the system temp folder). Every
  replica reads the upload by path, so on a multi-node cluster this must be shared storage.
- ``DUAL_ATTENTION_OVERLAY_CACHE``: how many recent overlay PNGs the service keeps (default 32).
- ``DUAL_ATTENTION_WORK_DIR``: the service's work folder; overlays are kept in its ``overlays/`` so that
  any ingress replica can answer for them (default: ``dual-attention-serve`` in the system temp folder;
  shared storage on a multi-node cluster, like the upload folder).
- ``DUAL_ATTENTION_MAX_LEVEL0_PIXELS``: largest slide accepted, as the level-0 width x height its header
  declares (default 2e10, e.g. 141k x 141k px); a larger one is refused (HTTP 413) before any pixel is read.
- ``DUAL_ATTENTION_MAX_THUMBNAIL_DECODE_MB``: most bytes a request may decode to make the slide's thumbnail
  (the RGBA pixels of the pyramid level it is read from; default 2048 MiB). A small file can declare a
  huge level without a pyramid; such a slide is refused (HTTP 413) before reading.
- ``DUAL_ATTENTION_REQUEST_DEADLINE_S``: a scoring request's deadline in seconds, checked between the
  stages and bounding each stage's wait (default 120); past it the answer is 504.
- ``DUAL_ATTENTION_TILE_READERS``: tile-reader actors in the ingress's tile pool (default 2).
- ``MLFLOW_TRACKING_URI``: the MLflow tracking/registry URI for ``models:/`` URIs.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "DUAL_ATTENTION_"
TOKEN_ENV = "DUAL_ATTENTION_API_TOKEN"
MIB = 1024 * 1024
# Largest agent batch in tiles (serve.batch); a request's tiles always fit in one batch, so this is also
# the ceiling of max_tiles.
MAX_BATCH_TILES = 64


class SettingsError(ValueError):
    """A serving setting is missing or malformed; the message names the setting."""


@dataclass(frozen=True)
class ServeSettings:
    model_uri: str
    slide_root: str = "."
    api_token: str | None = field(default=None, repr=False)  # never printed
    max_upload_bytes: int = 512 * MIB
    upload_dir: str | None = None
    overlay_cache_size: int = 32
    tile_readers: int = 2
    tracking_uri: str | None = None
    max_tiles: int = MAX_BATCH_TILES  # upper bound on a request's n_tiles
    max_glimpses: int = 32  # upper bound on a request's n_glimpses
    work_dir: str = field(default_factory=lambda: os.path.join(tempfile.gettempdir(), "dual-attention-serve"))
    # Limits that keep one request's work bounded whatever a (small) file declares; see the module doc.
    max_level0_pixels: int = 20_000_000_000
    max_thumbnail_decode_bytes: int = 2048 * MIB
    request_deadline_s: float = 120.0

    @property
    def overlay_dir(self) -> str:
        return os.path.join(self.work_dir, "overlays")

    def validate(self) -> ServeSettings:
        if not self.model_uri:
            raise SettingsError("model_uri is empty: set DUAL_ATTENTION_MODEL or pass model=... "
                                "(models:/NAME@ALIAS or a checkpoint path)")
        for name in ("max_upload_bytes", "overlay_cache_size", "tile_readers", "max_tiles", "max_glimpses",
                     "max_level0_pixels", "max_thumbnail_decode_bytes", "request_deadline_s"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.max_tiles > MAX_BATCH_TILES:
            raise SettingsError(f"max_tiles must be <= {MAX_BATCH_TILES} (the agent's batch), got {self.max_tiles}")
        if not os.path.isdir(self.slide_root):
            raise SettingsError(f"slide_root {self.slide_root!r} is not a folder")
        if self.upload_dir is not None and not os.path.isdir(self.upload_dir):
            raise SettingsError(f"upload_dir {self.upload_dir!r} is not a folder")
        try:
            os.makedirs(self.overlay_dir, exist_ok=True)
        except OSError as error:
            raise SettingsError(f"work_dir {self.work_dir!r}: cannot create its overlays folder ({error})") from None
        return self

    @classmethod
    def from_env(cls, overrides: Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None) -> ServeSettings:
        """Environment first, then ``overrides`` (e.g. the Serve app's ``args``) by field name.
        ``max_upload_mb`` / ``max_thumbnail_decode_mb`` are accepted as overrides for the ``_bytes`` fields."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {
            "model_uri": env.get(f"{ENV_PREFIX}MODEL", ""),
            "slide_root": env.get(f"{ENV_PREFIX}SLIDE_ROOT", "."),
            "api_token": env.get(TOKEN_ENV) or None,
            "upload_dir": env.get(f"{ENV_PREFIX}UPLOAD_DIR") or None,
            "tracking_uri": env.get("MLFLOW_TRACKING_URI") or None,
        }
        if env.get(f"{ENV_PREFIX}WORK_DIR"):
            values["work_dir"] = env[f"{ENV_PREFIX}WORK_DIR"]
        numeric_env = {
            "max_upload_bytes": ("MAX_UPLOAD_MB", MIB),
            "overlay_cache_size": ("OVERLAY_CACHE", 1),
            "tile_readers": ("TILE_READERS", 1),
            "max_level0_pixels": ("MAX_LEVEL0_PIXELS", 1),
            "max_thumbnail_decode_bytes": ("MAX_THUMBNAIL_DECODE_MB", MIB),
        }
        for name, (suffix, scale) in numeric_env.items():
            raw = env.get(f"{ENV_PREFIX}{suffix}")
            if raw:
                values[name] = int(_number(f"{ENV_PREFIX}{suffix}", raw) * scale)
        if env.get(f"{ENV_PREFIX}REQUEST_DEADLINE_S"):
            values["request_deadline_s"] = _number(f"{ENV_PREFIX}REQUEST_DEADLINE_S",
                                                   env[f"{ENV_PREFIX}REQUEST_DEADLINE_S"])
        overrides = dict(overrides or {})
        if "max_upload_mb" in overrides:
            values["max_upload_bytes"] = int(_number("max_upload_mb", overrides.pop("max_upload_mb")) * MIB)
        if "max_thumbnail_decode_mb" in overrides:
            values["max_thumbnail_decode_bytes"] = int(
                _number("max_thumbnail_decode_mb", overrides.pop("max_thumbnail_decode_mb")) * MIB)
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(overrides) - set(known)
        if unknown:
            raise SettingsError(f"unknown serve setting(s): {', '.join(sorted(unknown))}; "
                                f"known: {', '.join(sorted(known))}, max_upload_mb, max_thumbnail_decode_mb")
        for name, value in overrides.items():
            if value is None:
                continue
            if known[name].type == "int":
                value = int(_number(name, value))
            elif known[name].type == "float":
                value = _number(name, value)
            values[name] = value
        values["slide_root"] = os.path.realpath(values["slide_root"])
        return cls(**values).validate()


def _number(name: str, raw: Any) -> float:
    try:
        return float(raw)
    except (TypeError, ValueError):
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None


def patient_serve_proxy() -> None:
    """Serve's HTTP proxy as this project runs it. Call before ``ray.init``: the Serve controller and the
    proxies this process starts inherit the environment; an explicit setting wins.

    - 30 s, not Ray 2.60's 5 s, to pass its readiness check. On a loaded 2-core machine the proxy's start
      took longer; Serve then killed it and ``serve.start`` failed with ``ActorDiedError: ProxyActor``
      (seen in the quickstart test).
    - ``serve.proxy_retry``'s middleware: a request whose ingress replica died before answering is sent
      once more, or answered 503 JSON, instead of the proxy's plain-text 500."""
    from serve.proxy_retry import IMPORT_PATH

    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", IMPORT_PATH)
