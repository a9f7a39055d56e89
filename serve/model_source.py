"""Where the served model comes from: the MLflow registry (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``)
or a checkpoint path.

The app builder pins an alias to the version it points at *when the app is deployed* (``pin_model_uri``),
and every replica loads that pinned version. So the soft- and hard-attention stages always serve the same
version, and moving the alias to a new version takes effect on the next deploy (``serve run`` again,
``serve deploy`` of a changed config, or ``dual-attention serve``), with no code change.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dual_attention.config import DualAttentionConfig
from dual_attention.models import DualAttentionModel
from serve.redact import redact_paths

REGISTRY_SCHEME = "models:/"
logger = logging.getLogger("ray.serve")


class ModelLoadError(RuntimeError):
    """The model cannot be resolved or loaded; the message names the model (name and version, or the
    checkpoint's folder name, never a server path: it reaches HTTP answers) and the cause."""


@dataclass(frozen=True)
class ModelRef:
    """A model location after pinning: ``uri`` is loadable as is."""

    uri: str  # models:/NAME/VERSION or an absolute checkpoint path
    name: str
    version: str | None  # registry version; None for a checkpoint path
    alias: str | None  # the alias the request named, kept for /v1/model
    error: str | None = None  # why the URI could not be pinned; loading then fails with this message

    @property
    def public_uri(self) -> str:
        """The URI as answers show it: a registry URI as is, a checkpoint path by its name only."""
        return self.uri if self.uri.startswith(REGISTRY_SCHEME) else f"checkpoint:{self.name}"

    @property
    def label(self) -> str:
        """The model as messages name it."""
        if self.version is not None:
            return f"model {self.name!r} version {self.version}"
        return f"checkpoint {self.name!r}"


def pin_model_uri(uri: str, tracking_uri: str | None = None) -> ModelRef:
    """``models:/NAME@ALIAS`` -> the version the alias points at now; other URIs pass through."""
    if not uri.startswith(REGISTRY_SCHEME):
        path = Path(uri).expanduser().resolve()
        if not path.exists():
            logger.error("model checkpoint %s: no such file or folder", path)  # the full path: log only
            raise ModelLoadError(f"checkpoint {path.name!r}: no such checkpoint file or folder")
        name = path.parent.name if path.is_file() else path.name
        return ModelRef(uri=str(path), name=name, version=None, alias=None)
    rest = uri[len(REGISTRY_SCHEME):]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        try:
            version = str(_mlflow_client(tracking_uri).get_model_version_by_alias(name, alias).version)
        except Exception as error:  # MlflowException for unknown names/aliases, connection errors
            logger.error("cannot resolve %s: %s", uri, error)
            detail = redact_paths(str(error), {tracking_uri: "<tracking store>"} if tracking_uri else None)
            raise ModelLoadError(f"{uri}: cannot resolve alias '{alias}' of model '{name}': {detail}") from error
        return ModelRef(uri=f"{REGISTRY_SCHEME}{name}/{version}", name=name, version=version, alias=alias)
    if "/" in rest:
        name, version = rest.rsplit("/", 1)
        return ModelRef(uri=uri, name=name, version=version, alias=None)
    raise ModelLoadError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")


def load_model(ref: ModelRef, tracking_uri: str | None = None) -> tuple[DualAttentionModel, DualAttentionConfig,
                                                                        dict[str, Any]]:
    """Load the pinned model in eval mode -> (model, config, metadata)."""
    if ref.error is not None:
        raise ModelLoadError(ref.error)
    download_dir: str | None = None
    try:
        if ref.uri.startswith(REGISTRY_SCHEME):
            from jobs.runtime.tracking import load_registered_model  # the registry format's one home

            # The checkpoint is read into memory, so its downloaded copy can go right after.
            with tempfile.TemporaryDirectory(prefix="dual-attention-serve-model-") as download_dir:
                model, config, meta = load_registered_model(ref.uri, tracking_uri=tracking_uri,
                                                            download_dir=download_dir)
        else:
            from dual_attention.checkpoint import load_checkpoint

            model, config, meta = load_checkpoint(ref.uri)
    except ModelLoadError:
        raise
    except Exception as error:
        detail = f"{type(error).__name__}: {error}"
        logger.error("cannot load model %s: %s", ref.uri, detail)  # full paths go to the server's log only
        # Files are named relative to the downloaded artifacts or to the checkpoint's parent folder.
        root = download_dir if download_dir is not None else str(Path(ref.uri).parent)
        known = {root: "", **({tracking_uri: "<tracking store>"} if tracking_uri else {})}
        raise ModelLoadError(f"{ref.label}: cannot load model: {redact_paths(detail, known)}") from error
    model.eval()
    return model, config, dict(meta or {})


def _mlflow_client(tracking_uri: str | None) -> Any:
    from mlflow import MlflowClient  # imported only for registry URIs: mlflow takes seconds to import

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
