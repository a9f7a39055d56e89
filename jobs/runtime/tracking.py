"""MLflow helpers shared by training (jobs/), tuning (tune/), evaluation and serving (serve/).

Where runs go:

- By default a local store under the run folder: ``sqlite:///<run_dir>/mlflow.db`` for runs, metrics and
  the model registry (aliases included), and ``<run_dir>/mlartifacts`` for artifacts. No server needed.
- ``MLFLOW_TRACKING_URI`` in the environment, or an explicit ``uri`` (the jobs' ``--mlflow-uri``),
  points at a real tracking server instead (multi-node runs, where the run folder is not shared).
- A sqlite store keeps its artifacts beside the database file (``<db folder>/mlartifacts/<experiment
  id>/<run id>/``), whichever run folder created the experiment: runs of several run folders sharing one
  store each get their own run folder there, and none lands inside another run's folder. The first
  process to open a fresh sqlite store creates it behind a file lock (``<db>.lock``): MLflow creates the
  tables with migrations that two processes running at once would both apply ("duplicate column name").
  Many writers at once are better served by a tracking server (see the README).

The final model is registered as an MLflow pyfunc (``DualAttentionPyfunc``): a thin ``PythonModel`` that
wraps the checkpoint folder written by ``dual_attention.checkpoint.save_checkpoint``. The checkpoint stays
the one source of truth (it carries the config), so ``load_registered_model`` returns the same
``(model, config)`` whether it is given ``models:/NAME@ALIAS`` or a checkpoint path.

This module does not import Ray: serve/ and evaluation import it freely.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_EXPERIMENT = "dual-attention"
DEFAULT_ALIAS = "candidate"
# The artifact folder (inside the logged model) that holds the checkpoint folder.
CHECKPOINT_ARTIFACT_KEY = "checkpoint"
# Requirements written into the logged model; listed explicitly because MLflow's inference of them loads
# the model in a subprocess, which costs seconds and guesses poorly for an editable project.
PYFUNC_PIP_REQUIREMENTS = ["torch==2.13.0", "numpy", "pandas", "openslide-python", "openslide-bin", "scikit-image"]
# Overrides where downloaded registered models are cached (model_cache_dir).
MODEL_CACHE_ENV = "DUAL_ATTENTION_MODEL_CACHE"
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def default_model_name(task: str) -> str:
    """The registered-model name jobs use unless told otherwise: ``dual-attention-<task>``."""
    return f"dual-attention-{task}"


# -- where runs are stored ---------------------------------------------------------------------------------


# mlflow.set_tracking_uri also exports the URI as $MLFLOW_TRACKING_URI, so after one run in a process the
# variable would look like the user's choice to the next run. Remember what we exported and what it hid.
_exported_uri: str | None = None
_user_uri_before_export: str | None = None


def _user_tracking_env() -> str | None:
    """``$MLFLOW_TRACKING_URI`` as the user (or the Ray job's environment) set it, not as we exported it."""
    current = os.environ.get("MLFLOW_TRACKING_URI") or None
    if current is not None and current == _exported_uri:
        return _user_uri_before_export
    return current


def resolve_tracking_uri(run_dir: str | Path | None = None, uri: str | None = None) -> str:
    """``uri`` if given, else ``$MLFLOW_TRACKING_URI``, else a sqlite store in ``run_dir``."""
    if uri:
        return uri
    user_env = _user_tracking_env()
    if user_env:
        return user_env
    if run_dir is None:
        raise ValueError("no MLflow tracking URI: pass --mlflow-uri, set MLFLOW_TRACKING_URI, or give a run folder")
    return sqlite_uri(Path(run_dir) / "mlflow.db")


def sqlite_uri(db_path: str | Path) -> str:
    return f"sqlite:///{Path(db_path).resolve()}"


def sqlite_db_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for any other store)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///"):].split("?", 1)[0])


def artifact_root(tracking_uri: str) -> str | None:
    """Where a new experiment of this store keeps its runs' artifacts: ``<db folder>/mlartifacts`` for a
    sqlite store (each run under ``<experiment id>/<run id>/``); None (MLflow's choice) for a file store,
    which keeps artifacts inside itself, and for a tracking server, which has its own artifact store."""
    db_path = sqlite_db_path(tracking_uri)
    return None if db_path is None else (db_path.resolve().parent / "mlartifacts").as_uri()


def store_lock(tracking_uri: str, timeout_s: float = 300.0) -> Any:
    """A file lock beside a sqlite store (``<db>.lock``), held while the store is created and its
    experiment looked up or made; a no-op context for other stores (a server serialises by itself)."""
    import contextlib

    from filelock import FileLock

    db_path = sqlite_db_path(tracking_uri)
    if db_path is None:
        return contextlib.nullcontext()
    db_path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(db_path) + ".lock", timeout=timeout_s)


def setup_mlflow(run_dir: str | Path | None = None, uri: str | None = None,
                 experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Point MLflow at the tracking store and make sure ``experiment`` exists; returns its id.

    A new experiment of a sqlite store keeps its artifacts beside the database (``artifact_root``), so
    each run's artifacts sit under its own run id whichever run folder made the experiment. The store
    is created (on first use) and the experiment found or made under ``store_lock``."""
    import mlflow

    global _exported_uri, _user_uri_before_export
    tracking_uri = resolve_tracking_uri(run_dir, uri)
    _user_uri_before_export, _exported_uri = _user_tracking_env(), tracking_uri
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    with store_lock(tracking_uri):
        found = mlflow.get_experiment_by_name(experiment)  # creates the store's tables when it is new
        if found is None:
            try:
                experiment_id = mlflow.create_experiment(experiment, artifact_location=artifact_root(tracking_uri))
            except Exception:  # made meanwhile by a process that shares the store without this lock
                found = mlflow.get_experiment_by_name(experiment)
                if found is None:
                    raise
        if found is not None:
            experiment_id = found.experiment_id
            expected = artifact_root(tracking_uri)
            if expected is not None and found.artifact_location.rstrip("/") != expected.rstrip("/"):
                # an experiment made before artifacts went beside the store (an experiment's artifact
                # location is fixed at its creation): say where this run's artifacts will go
                print(f"[mlflow] note: experiment '{experiment}' keeps its artifacts at "
                      f"{found.artifact_location} (fixed when it was created), not beside the store at {expected}",
                      flush=True)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


# -- logging -----------------------------------------------------------------------------------------------


def flatten_params(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"loss": {"alpha": 0.5}}`` -> ``{"loss.alpha": "0.5"}`` (MLflow params are flat strings)."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def log_config(config: Any, extra: Mapping[str, Any] | None = None) -> None:
    """Log a ``DualAttentionConfig`` (or its dict) as flattened params, plus its digest and ``extra``."""
    import mlflow

    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    params = flatten_params(data)
    if hasattr(config, "digest"):
        params["config_digest"] = config.digest()
    if extra:
        params.update(flatten_params(extra))
    mlflow.log_params(params)


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric entries of ``metrics`` (MLflow refuses strings; NaN carries no information)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(float(value)):
            out[key] = float(value)
    return out


def log_metrics(metrics: Mapping[str, Any], step: int) -> None:
    import mlflow

    values = numeric_metrics(metrics)
    if values:
        mlflow.log_metrics(values, step=step)


def log_checkpoint(checkpoint_dir: str | Path, artifact_path: str = "checkpoints") -> None:
    """Log a checkpoint folder as artifacts under ``artifact_path/<folder name>``."""
    import mlflow

    checkpoint_dir = Path(checkpoint_dir)
    mlflow.log_artifacts(str(checkpoint_dir), artifact_path=f"{artifact_path}/{checkpoint_dir.name}")


def log_pngs(paths: list[str | Path], artifact_path: str) -> None:
    import mlflow

    for path in paths:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


# -- the registered model ----------------------------------------------------------------------------------

try:  # mlflow is a hard dependency; the guard only keeps this module importable in trimmed environments
    import mlflow.pyfunc as _pyfunc

    _PythonModelBase: type = _pyfunc.PythonModel
except ImportError:  # pragma: no cover
    _PythonModelBase = object


class DualAttentionPyfunc(_PythonModelBase):  # type: ignore[misc,valid-type]
    """MLflow pyfunc around a dual attention checkpoint.

    Input: a DataFrame with a ``slide_path`` column (and an optional integer ``seed`` column). Output: one
    row per slide with ``predicted_class``, ``predicted_label``, ``confidence``,
    ``fraction_level0_read`` and one ``prob_<class name>`` column per class. Slides are read in-process
    with OpenSlide (no Ray), so the registered model is usable on its own, e.g. ``mlflow models predict``.
    """

    def load_context(self, context: Any) -> None:
        from dual_attention.checkpoint import load_checkpoint

        self.model, self.config, self.meta = load_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT_KEY])
        self.model.eval()

    # No type hints here: MLflow reads predict's hints as a schema and would override the signature.
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        import pandas as pd

        if not hasattr(self, "model"):
            self.load_context(context)
        if "slide_path" not in model_input.columns:
            raise ValueError(f"model input needs a 'slide_path' column, got columns {list(model_input.columns)}")
        rows = []
        for i, row in enumerate(model_input.itertuples(index=False)):
            seed = int(getattr(row, "seed", i) if "seed" in model_input.columns else i)
            rows.append(score_slide_file(self.model, self.config, str(row.slide_path), seed))
        return pd.DataFrame(rows, columns=output_columns(self.config.class_names))


def output_columns(class_names: tuple[str, ...]) -> list[str]:
    return ["slide_path", "predicted_class", "predicted_label", "confidence", "fraction_level0_read"] + [
        f"prob_{name}" for name in class_names
    ]


def score_slide_file(model: Any, config: Any, slide_path: str, seed: int) -> dict[str, Any]:
    """Score one slide file in-process (OpenSlide reads, no Ray): the pyfunc's and tests' route."""

    from dual_attention.pipeline import score_slide_path

    score, _, _ = score_slide_path(model, config, slide_path, seed)
    out = {
        "slide_path": slide_path,
        "predicted_class": int(score.predicted_class),
        "predicted_label": str(score.predicted_label),
        "confidence": float(score.confidence),
        "fraction_level0_read": float(score.fraction_level0_read),
    }
    for name, p in zip(config.class_names, score.class_probabilities, strict=True):
        out[f"prob_{name}"] = float(p)
    return out


def model_signature(class_names: tuple[str, ...]) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([ColSpec("string", "slide_path"), ColSpec("long", "seed", required=False)])
    outputs = Schema(
        [ColSpec("string", "slide_path"), ColSpec("long", "predicted_class"), ColSpec("string", "predicted_label"),
         ColSpec("double", "confidence"), ColSpec("double", "fraction_level0_read")]
        + [ColSpec("double", f"prob_{name}") for name in class_names]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    version: str
    alias: str
    model_uri: str  # models:/NAME@ALIAS


def register_model(checkpoint_dir: str | Path, class_names: tuple[str, ...], name: str,
                   alias: str = DEFAULT_ALIAS, tags: Mapping[str, str] | None = None) -> RegisteredModel:
    """Log the checkpoint as a pyfunc model in the active run, register it as ``name`` and point
    ``alias`` at the new version. Needs an active MLflow run."""
    import mlflow
    from mlflow import MlflowClient

    if mlflow.active_run() is None:
        raise RuntimeError("register_model needs an active MLflow run (mlflow.start_run)")
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=DualAttentionPyfunc(),
        artifacts={CHECKPOINT_ARTIFACT_KEY: str(Path(checkpoint_dir).resolve())},
        signature=model_signature(class_names),
        pip_requirements=PYFUNC_PIP_REQUIREMENTS,
    )
    # The model registers in the store of the run it is logged in: a registry URI left set in this process by
    # an earlier run on another store (mlflow keeps it global, and exports it) must not take it elsewhere.
    store = mlflow.get_tracking_uri()
    mlflow.set_registry_uri(store)
    version = mlflow.register_model(info.model_uri, name, tags=dict(tags or {}))
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    client.set_registered_model_alias(name, alias, version.version)
    return RegisteredModel(name=name, version=str(version.version), alias=alias, model_uri=f"models:/{name}@{alias}")


def _find_checkpoint_dir(root: Path) -> Path:
    """The folder holding ``model.pt`` inside a downloaded model's artifacts."""
    if (root / "model.pt").is_file():
        return root
    found = sorted(root.rglob("model.pt"))
    if not found:
        raise FileNotFoundError(f"no model.pt under the downloaded model artifacts at {root}")
    return found[0].parent


def model_cache_dir() -> Path:
    """Where registered models are kept once downloaded: ``$DUAL_ATTENTION_MODEL_CACHE``, else
    ``$XDG_CACHE_HOME/dual-attention/models``, else ``~/.cache/dual-attention/models``."""
    configured = os.environ.get(MODEL_CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dual-attention" / "models"


def _cache_key(tracking_uri: str, version: Any) -> str:
    """``<name>-v<version>-<digest>``: the digest covers the store and the version's source and creation
    time, because two stores (or a store deleted and made again) can each hold a different version 1."""
    digest = hashlib.sha256(
        f"{tracking_uri}\n{version.source}\n{version.creation_timestamp}".encode()).hexdigest()[:12]
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', version.name)}-v{version.version}-{digest}"


def _cached_download(client: Any, tracking_uri: str, version: Any, cache_dir: Path) -> Path:
    """The version's artifacts in ``cache_dir`` (downloaded on first use); returns their folder.

    Downloaded into a private folder inside the cache, then renamed into place: the rename is atomic,
    so a reader sees a complete copy or none, and of two processes downloading at once one copy stays."""
    import mlflow

    final = cache_dir / _cache_key(tracking_uri, version)
    if final.is_dir():
        if any(final.rglob("model.pt")):
            return final
        shutil.rmtree(final, ignore_errors=True)  # not made by the rename below: download it again
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=cache_dir))
    try:
        # From the version's artifact location through this client: a "models:/" download would resolve
        # the logged model through the process-wide tracking URI (and create ./mlflow.db when unset).
        artifact_uri = client.get_model_version_download_uri(version.name, version.version)
        mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(partial),
                                            tracking_uri=tracking_uri)
        try:
            os.rename(partial, final)
        except OSError:
            if not any(final.rglob("model.pt")):  # not a copy another process put there first
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone already when the rename succeeded
    return final


def load_registered_model(ref: str | Path, tracking_uri: str | None = None,
                          download_dir: str | Path | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a checkpoint path -> (model, config, meta).

    ``meta`` has ``name``, ``version``, ``alias`` (None for a bare checkpoint path) and ``source`` (where
    the checkpoint was read from). The model is in eval mode, on CPU. A registered version is downloaded
    into ``download_dir`` when given (the caller's to remove), else once into the model cache
    (``model_cache_dir``) and read from there by later loads of the same version."""
    import mlflow
    from mlflow import MlflowClient

    from dual_attention.checkpoint import load_checkpoint

    ref_str = str(ref)
    match = _MODEL_URI.match(ref_str)
    if match is None:
        path = Path(ref_str)
        if not path.exists():
            raise FileNotFoundError(
                f"model reference '{ref_str}' is neither models:/NAME@ALIAS, models:/NAME/VERSION nor an existing "
                "checkpoint path"
            )
        model, config, _ = load_checkpoint(path)
        model.eval()
        return model, config, {"name": None, "version": None, "alias": None, "source": str(path.resolve())}

    uri = tracking_uri or mlflow.get_tracking_uri()  # the latter reads $MLFLOW_TRACKING_URI
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name, alias = match["name"], match["alias"]
    if alias is not None:
        version = client.get_model_version_by_alias(name, alias)
    else:
        version = client.get_model_version(name, match["version"])
    if download_dir is not None:
        # Download from the version's artifact location through this client: a "models:/" download would
        # resolve the logged model through the process-wide tracking URI (and create ./mlflow.db when unset).
        artifact_uri = client.get_model_version_download_uri(name, version.version)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(download_dir),
                                                         tracking_uri=uri))
    else:
        local = _cached_download(client, uri, version, model_cache_dir())
    checkpoint_dir = _find_checkpoint_dir(local)
    model, config, _ = load_checkpoint(checkpoint_dir)
    model.eval()
    meta = {"name": name, "version": str(version.version), "alias": alias, "source": str(checkpoint_dir)}
    return model, config, meta


def load_model_for_cli(ref: str, tracking_uri: str | None) -> tuple[Any, Any, dict[str, Any]] | None:
    """``load_registered_model`` for a command line: None, with one ``error: cannot load model ...`` line
    on stderr, when the model cannot be loaded (the caller exits 2)."""
    import sys

    try:
        return load_registered_model(ref, tracking_uri=tracking_uri)
    except Exception as error:  # noqa: BLE001 - any load failure is reported the same way
        print(f"error: cannot load model {ref}: {error}", file=sys.stderr)
        return None
