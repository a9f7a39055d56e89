"""Save and load a model together with the config that made it (serving needs nothing else)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dual_attention.config import DualAttentionConfig
from dual_attention.models import DualAttentionModel

CHECKPOINT_FILE = "model.pt"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be read; the message names the file and the cause."""


def save_checkpoint(directory: str | Path, model: DualAttentionModel, config: DualAttentionConfig,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write ``directory/model.pt`` holding the state dict, ``config.to_dict()`` and ``extra`` (plain
    Python values: numbers, strings, lists, dicts). Returns the file's path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_FILE
    payload = {
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "config_digest": config.digest(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": dict(extra or {}),
    }
    tmp = path.with_suffix(".pt.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # a reader never sees half a file
    return path


def load_checkpoint(path: str | Path) -> tuple[DualAttentionModel, DualAttentionConfig, dict[str, Any]]:
    """``path`` is ``model.pt`` or the folder holding it -> (model in eval mode, config, extra)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(payload, dict) or "config" not in payload or "state_dict" not in payload:
        raise CheckpointError(f"{path}: missing 'config' or 'state_dict'")
    config = DualAttentionConfig.from_dict(payload["config"])
    model = DualAttentionModel(config)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        raise CheckpointError(f"{path}: weights do not fit the config's model ({error})") from error
    model.eval()
    return model, config, dict(payload.get("extra", {}))
