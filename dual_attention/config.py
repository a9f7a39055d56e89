"""One typed configuration for the whole product, with presets.

The same object flows from the command line or YAML into jobs, tune and serve, and every checkpoint
carries it (``DualAttentionConfig.to_dict``), so that serving never needs the training command line.

Units are in the field names: ``*_level0_px`` are level-0 pixels, ``*_thumb_px`` are thumbnail pixels,
``*_px`` alone is the size of a network input.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

Task = Literal["her2", "mmr"]
AttentionMask = Literal["positive", "tumour"]
TrainMode = Literal["joint", "separate"]
SamSignal = Literal["agent_reward", "ats"]
TrainSampler = Literal["gumbel", "paper"]
FirstGlimpse = Literal["random", "policy"]

NUM_CLASSES: dict[str, int] = {"her2": 4, "mmr": 2}
CLASS_NAMES: dict[str, tuple[str, ...]] = {"her2": ("0", "1+", "2+", "3+"), "mmr": ("intact", "loss")}


class ConfigError(ValueError):
    """A configuration value is refused; the message names the field."""


@dataclass(frozen=True)
class SlideConfig:
    thumbnail_downsample: int = 32  # s: thumbnail is 1/s of level 0 (40x -> 1.25x)
    tissue_min_area_thumb_px: int = 16  # tissue components smaller than this are dropped

    def validate(self) -> None:
        _positive(self, "thumbnail_downsample", "tissue_min_area_thumb_px")


@dataclass(frozen=True)
class SoftAttentionConfig:
    conv_layers: int = 4
    base_channels: int = 8  # doubles every layer
    pool_size: int = 8  # max-pool kernel after the convs (stride 1, 'same'), widens the receptive field
    attention_mask: AttentionMask = "positive"  # adaptive threshold ("positive") or 3-means ("tumour")

    def validate(self) -> None:
        _positive(self, "conv_layers", "base_channels", "pool_size")
        _one_of(self, "attention_mask", ("positive", "tumour"))


@dataclass(frozen=True)
class SamplerConfig:
    n_tiles: int = 10  # N tiles kept per slide
    n_candidates: int = 20  # top 2N candidates before the distance filter
    min_distance_thumb_px: float = 8.0  # d_t, between kept locations, thumbnail pixels
    noise_low: float = 0.0  # noise U[low, high] added inside the mask only
    noise_high: float = 1.0
    # A map whose max/min over tissue is below 1 + min_contrast counts as flat: min-max normalisation would
    # stretch float noise into a full (0, 1] range and hide that the attention says nothing.
    min_contrast: float = 0.05
    # Training draws tiles from the attention itself (Gumbel keys, the first N d_t apart): the SAM's REINFORCE
    # signal needs samples from the distribution it differentiates. "paper" trains on the scoring sampler.
    train_sampler: TrainSampler = "gumbel"

    def validate(self) -> None:
        _positive(self, "n_tiles", "n_candidates")
        _one_of(self, "train_sampler", ("gumbel", "paper"))
        if self.min_contrast < 0:
            raise ConfigError(f"sampler.min_contrast must be >= 0, got {self.min_contrast}")
        if self.n_candidates < self.n_tiles:
            raise ConfigError(f"sampler.n_candidates ({self.n_candidates}) must be >= sampler.n_tiles ({self.n_tiles})")
        if self.min_distance_thumb_px < 0:
            raise ConfigError(f"sampler.min_distance_thumb_px must be >= 0, got {self.min_distance_thumb_px}")
        if not self.noise_high > self.noise_low:
            raise ConfigError(
                f"sampler.noise_high ({self.noise_high}) must be greater than sampler.noise_low ({self.noise_low})"
            )


@dataclass(frozen=True)
class TileConfig:
    tile_level0_px: int = 2048  # side of a sampled tile at level 0
    feature_input_px: int = 128  # tiles are resized to this for the tile feature extractor f_f
    feature_channels: int = 32
    feature_layers: int = 8

    def validate(self) -> None:
        _positive(self, "tile_level0_px", "feature_input_px", "feature_channels", "feature_layers")
        if self.feature_layers < 3:
            raise ConfigError(f"tile.feature_layers must be >= 3 (stem + one residual block), got {self.feature_layers}")


@dataclass(frozen=True)
class AgentConfig:
    glimpse_px: int = 128  # side of each glimpse given to the glimpse network
    glimpse_scales: int = 2  # scale k covers glimpse_px * 2**k level-0 pixels (40x, 20x, ...)
    n_glimpses: int = 6  # T
    glimpse_hidden: int = 128  # size of the "what" and "where" codes
    hidden_size: int = 256  # LSTM state
    context_px: int = 64  # downscaled tile seen by the context network
    location_std: float = 0.1  # std of the Gaussian policy, in [-1, 1] coordinates (after the anneal)
    # REINFORCE explores widely first, then sharpens: std goes linearly from location_std_start to
    # location_std over the first location_std_anneal_steps optimiser steps (0: fixed location_std).
    location_std_start: float = 0.25
    location_std_anneal_steps: int = 0
    first_glimpse: FirstGlimpse = "random"  # paper: a random first glimpse; "policy": from the context net
    relative_moves: bool = True  # later glimpses move from the previous one; False: absolute (the paper's)

    def validate(self) -> None:
        _positive(self, "glimpse_px", "glimpse_scales", "n_glimpses", "glimpse_hidden", "hidden_size", "context_px")
        for name in ("location_std", "location_std_start"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"agent.{name} must be in (0, 1), got {getattr(self, name)}")
        if self.location_std_anneal_steps < 0:
            raise ConfigError(f"agent.location_std_anneal_steps must be >= 0, got {self.location_std_anneal_steps}")
        _one_of(self, "first_glimpse", ("random", "policy"))


@dataclass(frozen=True)
class LossConfig:
    alpha: float = 0.5  # L_J = L_HA + alpha**e * L_SA, e = max(0, epoch - alpha_hold_epochs)
    # The paper decays L_SA from the first epoch (hold 0); 0.5**epoch switches the SAM off before it has
    # learnt anything when epochs are few, so the CPU preset holds L_SA at full weight.
    alpha_hold_epochs: int = 0
    beta: float = 1.0  # entropy term of L_SA; positive raises entropy
    delta: float = 1.0  # L_HA = L_theta + delta * (L_bb + L_s)
    # What teaches the SAM where to look. "agent_reward" (default): REINFORCE through the sampler's
    # log-probability, reward = the agent's probability of the slide's label on each sampled tile, minus
    # the slide's mean (tiles where the evidence is). "ats": the paper's attention-sampling expectation of
    # tile features into a SAM head (measured here: it rewards tiles that look like the label, the sign
    # flips by class and the map never moves; kept selectable).
    sam_signal: SamSignal = "agent_reward"

    def validate(self) -> None:
        if not 0 < self.alpha <= 1:
            raise ConfigError(f"loss.alpha must be in (0, 1], got {self.alpha}")
        if self.alpha_hold_epochs < 0:
            raise ConfigError(f"loss.alpha_hold_epochs must be >= 0, got {self.alpha_hold_epochs}")
        _one_of(self, "sam_signal", ("agent_reward", "ats"))
        if self.delta < 0:
            raise ConfigError(f"loss.delta must be >= 0, got {self.delta}")


@dataclass(frozen=True)
class TrainConfig:
    mode: TrainMode = "joint"
    epochs: int = 30
    slides_per_batch: int = 4  # every class present in a batch
    steps_per_epoch: int = 0  # 0: one pass over the training slides
    lr_sam: float = 1e-4
    lr_agent: float = 1e-3
    lr_step_size: int = 10  # StepLR
    lr_gamma: float = 0.5
    num_workers: int = 2
    seed: int = 0
    val_fold: int = 0  # fold held out for validation
    # The agent reads tiles alone for this many optimiser steps before L_SA joins: until the agent can
    # read, its reward says nothing about where the evidence is.
    sam_warmup_steps: int = 0
    # Warn when, at the end of this epoch (0-based), the validation attention has not moved: normalised
    # entropy above 0.995 (flat), or attention on tumour no more than 1.1x tumour's share. -1: never.
    attention_check_epoch: int = 1

    def validate(self) -> None:
        _one_of(self, "mode", ("joint", "separate"))
        _positive(self, "epochs", "slides_per_batch", "lr_sam", "lr_agent", "lr_step_size", "num_workers")
        if not 0 < self.lr_gamma <= 1:
            raise ConfigError(f"train.lr_gamma must be in (0, 1], got {self.lr_gamma}")
        if self.steps_per_epoch < 0:
            raise ConfigError(f"train.steps_per_epoch must be >= 0, got {self.steps_per_epoch}")
        if self.sam_warmup_steps < 0:
            raise ConfigError(f"train.sam_warmup_steps must be >= 0, got {self.sam_warmup_steps}")
        if self.mode == "separate" and self.epochs < 2:
            # separate mode trains the SAM for the first ceil(epochs/2) epochs, then the agent
            raise ConfigError(f"train.epochs must be >= 2 when train.mode is 'separate', got {self.epochs}")


@dataclass(frozen=True)
class DualAttentionConfig:
    task: Task = "her2"
    preset: str = "custom"
    slide: SlideConfig = field(default_factory=SlideConfig)
    soft_attention: SoftAttentionConfig = field(default_factory=SoftAttentionConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    tile: TileConfig = field(default_factory=TileConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES[self.task]

    @property
    def class_names(self) -> tuple[str, ...]:
        return CLASS_NAMES[self.task]

    def validate(self) -> DualAttentionConfig:
        _one_of(self, "task", tuple(NUM_CLASSES))
        for section in _SECTIONS:
            getattr(self, section).validate()
        largest_glimpse = self.agent.glimpse_px * 2 ** (self.agent.glimpse_scales - 1)
        if largest_glimpse > self.tile.tile_level0_px:
            raise ConfigError(
                f"agent.glimpse_px * 2**(agent.glimpse_scales-1) = {largest_glimpse} exceeds "
                f"tile.tile_level0_px = {self.tile.tile_level0_px}"
            )
        return self

    # -- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DualAttentionConfig:
        data = dict(data)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        kwargs: dict[str, Any] = {}
        for name in ("task", "preset"):
            if name in data:
                kwargs[name] = data[name]
        for section, section_cls in _SECTIONS.items():
            values = data.get(section, {}) or {}
            if not isinstance(values, dict):
                raise ConfigError(f"config section '{section}' must be a mapping, got {type(values).__name__}")
            values = {k: v for k, v in values.items() if k not in _REMOVED_FIELDS.get(section, ())}
            allowed = {f.name: f for f in fields(section_cls)}
            bad = set(values) - set(allowed)
            if bad:
                raise ConfigError(f"unknown field(s) in '{section}': {', '.join(f'{section}.{b}' for b in sorted(bad))}")
            kwargs[section] = section_cls(**{k: _coerce(section, allowed[k], v) for k, v in values.items()})
        return cls(**kwargs).validate()

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: str | Path) -> DualAttentionConfig:
        """Load a YAML file: either a full config, or ``preset: NAME`` plus the fields to change."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config file must hold a mapping")
        base = preset(data["preset"]).to_dict() if data.get("preset") in PRESETS else {}
        return cls.from_dict(_deep_merge(base, data))

    def with_overrides(self, overrides: dict[str, Any] | list[str] | None) -> DualAttentionConfig:
        """Apply ``{"loss.alpha": 0.7}`` or ``["loss.alpha=0.7"]``; refuses unknown fields by name."""
        if not overrides:
            return self
        if isinstance(overrides, list):
            parsed: dict[str, Any] = {}
            for item in overrides:
                if "=" not in item:
                    raise ConfigError(f"override '{item}' is not of the form section.field=value")
                key, value = item.split("=", 1)
                parsed[key.strip()] = yaml.safe_load(value)
            overrides = parsed
        data = self.to_dict()
        for dotted, value in overrides.items():
            parts = dotted.split(".")
            target = data
            for part in parts[:-1]:
                if not isinstance(target.get(part), dict):
                    raise ConfigError(f"unknown config field: {dotted}")
                target = target[part]
            if parts[-1] not in target:
                raise ConfigError(f"unknown config field: {dotted}")
            target[parts[-1]] = value
        return DualAttentionConfig.from_dict(data)

    def digest(self) -> str:
        """Short stable hash of the whole config (shown by serve's /v1/model)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# Fields configs once had and checkpoints, run folders and registered models still carry; read and dropped.
# train.use_gpu: written by the jobs but never read (the device is a run setting, ``--device``).
_REMOVED_FIELDS: dict[str, tuple[str, ...]] = {"train": ("use_gpu",)}

_SECTIONS: dict[str, type] = {
    "slide": SlideConfig,
    "soft_attention": SoftAttentionConfig,
    "sampler": SamplerConfig,
    "tile": TileConfig,
    "agent": AgentConfig,
    "loss": LossConfig,
    "train": TrainConfig,
}


# -- command-line flags ---------------------------------------------------------------------------------------

# Flags that set one train-section field: (flag, dotted field, argparse options). Their values land under
# ``_shortcut_dest(flag)``, so that a job's own flag of the same name (tune's --mode) keeps its own.
_SHORTCUT_FLAGS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("--epochs", "train.epochs", {"type": int}),
    ("--num-workers", "train.num_workers", {"type": int, "help": "train.num_workers (Ray Train workers)"}),
    ("--mode", "train.mode", {"choices": ("joint", "separate")}),
    ("--val-fold", "train.val_fold", {"type": int, "help": "train.val_fold: the manifest fold held out for validation"}),
)


def _shortcut_dest(flag: str) -> str:
    return "config_" + flag.removeprefix("--").replace("-", "_")


def add_config_flags(parser: argparse.ArgumentParser, shortcuts: tuple[str, ...] | None = None) -> None:
    """The flags that build a config, the same for every job that trains (train, tune): a preset or a YAML
    file, ``--set`` overrides and shortcut flags for the most changed train fields (all, or those named in
    ``shortcuts``). ``config_from_flags`` reads them back."""
    parser.add_argument("--preset", default="cpu-small", help=f"config preset: {', '.join(PRESETS)}")
    parser.add_argument("--task", choices=tuple(NUM_CLASSES), help="switch the preset's task")
    parser.add_argument("--config", help="YAML config file (full, or 'preset: NAME' plus changes)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="config override, repeatable (e.g. --set loss.alpha=0.7)")
    for flag, dotted, options in _SHORTCUT_FLAGS:
        if shortcuts is None or flag in shortcuts:
            metavar = {} if "choices" in options else {"metavar": flag.removeprefix("--").replace("-", "_").upper()}
            parser.add_argument(flag, dest=_shortcut_dest(flag), **{"help": dotted, **metavar, **options})


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that name a trained model, the same for every job that loads one (score, score-cohort,
    evaluate, the random-sampling baseline); ``jobs.runtime.tracking.load_model_for_cli`` loads what they name."""
    parser.add_argument("--model", required=True,
                        help="models:/NAME@ALIAS, models:/NAME/VERSION, or a checkpoint folder / model.pt")
    parser.add_argument("--mlflow-uri", default=None, help="tracking URI for models:/ references")


def flag_overrides(args: argparse.Namespace, shortcuts: tuple[str, ...] | None = None) -> list[str]:
    """``--set`` overrides plus the shortcut flags given (all, or those named in ``shortcuts``)."""
    overrides = list(args.set)
    for flag, dotted, _ in _SHORTCUT_FLAGS:
        value = getattr(args, _shortcut_dest(flag), None)
        if value is not None and (shortcuts is None or flag in shortcuts):
            overrides.append(f"{dotted}={value}")
    return overrides


def config_from_flags(args: argparse.Namespace) -> DualAttentionConfig:
    """The config ``add_config_flags``'s flags describe; a refused value raises ``ConfigError`` naming it."""
    config = DualAttentionConfig.from_yaml(args.config) if args.config else preset(args.preset, task=args.task)
    return config.with_overrides(flag_overrides(args))


def _positive(section: Any, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if not value > 0:
            raise ConfigError(f"{_section_name(section)}.{name} must be > 0, got {value!r}")


def _one_of(section: Any, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(section, name)
    if value not in allowed:
        prefix = "" if isinstance(section, DualAttentionConfig) else f"{_section_name(section)}."
        raise ConfigError(f"{prefix}{name} must be one of {allowed}, got {value!r}")


def _section_name(section: Any) -> str:
    for name, cls in _SECTIONS.items():
        if isinstance(section, cls):
            return name
    return type(section).__name__


def _coerce(section: str, spec: dataclasses.Field, value: Any) -> Any:
    """YAML and command lines give ints for floats and strings for numbers; check and convert."""
    kind = spec.type if isinstance(spec.type, str) else getattr(spec.type, "__name__", "")
    try:
        if kind == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false"):
                    raise TypeError
                return value.lower() == "true"
            if not isinstance(value, bool):
                raise TypeError
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"{section}.{spec.name} must be {kind}, got {value!r}") from None
    return value


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# -- presets ----------------------------------------------------------------------------------------------


def _paper_her2() -> DualAttentionConfig:
    return DualAttentionConfig(
        task="her2",
        preset="paper-her2",
        soft_attention=SoftAttentionConfig(conv_layers=4, base_channels=8, pool_size=8, attention_mask="positive"),
        sampler=SamplerConfig(n_tiles=10, n_candidates=20, min_distance_thumb_px=64.0, noise_low=0.0, noise_high=1.0),
        tile=TileConfig(tile_level0_px=2048, feature_input_px=128),
        agent=AgentConfig(glimpse_px=128, glimpse_scales=2, n_glimpses=6, glimpse_hidden=128, hidden_size=256),
        loss=LossConfig(alpha=0.5, beta=1.0, delta=1.0),
        train=TrainConfig(epochs=30, slides_per_batch=4, lr_sam=1e-4, lr_agent=1e-3),
    )


def _paper_mmr() -> DualAttentionConfig:
    return DualAttentionConfig(
        task="mmr",
        preset="paper-mmr",
        soft_attention=SoftAttentionConfig(conv_layers=5, base_channels=8, pool_size=3, attention_mask="tumour"),
        sampler=SamplerConfig(n_tiles=15, n_candidates=30, min_distance_thumb_px=64.0, noise_low=-2.0, noise_high=1.0),
        tile=TileConfig(tile_level0_px=2048, feature_input_px=128),
        agent=AgentConfig(glimpse_px=128, glimpse_scales=2, n_glimpses=6, glimpse_hidden=128, hidden_size=256),
        loss=LossConfig(alpha=0.5, beta=1.0, delta=1.0),
        train=TrainConfig(epochs=30, slides_per_batch=2, lr_sam=1e-4, lr_agent=1e-3),
    )


def _cpu_small() -> DualAttentionConfig:
    """Sizes that train in minutes on 2 CPU cores, on the synthetic cohort's small slides."""
    return DualAttentionConfig(
        task="her2",
        preset="cpu-small",
        slide=SlideConfig(thumbnail_downsample=32, tissue_min_area_thumb_px=4),
        soft_attention=SoftAttentionConfig(conv_layers=3, base_channels=8, pool_size=3, attention_mask="positive"),
        sampler=SamplerConfig(n_tiles=4, n_candidates=8, min_distance_thumb_px=6.0, noise_low=0.0, noise_high=1.0),
        tile=TileConfig(tile_level0_px=256, feature_input_px=64, feature_channels=16, feature_layers=4),
        # Settings chosen on cohort seeds 101 and 202 (HER2 and MMR, 48 slides of 3072², validation fold 0),
        # never on the benchmark's test cohorts: the agent needs ~1000 updates to read tiles (10 epochs x
        # 100 steps), L_SA joins after 200 agent-only steps and keeps full weight (alpha is held: 0.5**epoch
        # would switch it off by epoch 5), the policy's std anneals 0.25 -> 0.1 over 600 steps, and beta is
        # 0.1: at the paper's 1 the entropy term held the attention at ~1.7x tumour's share (0.1: 2.6-2.9).
        agent=AgentConfig(glimpse_px=32, glimpse_scales=2, n_glimpses=4, glimpse_hidden=64, hidden_size=128,
                          context_px=32, location_std=0.1, location_std_start=0.25, location_std_anneal_steps=600),
        loss=LossConfig(alpha=0.5, alpha_hold_epochs=1000, beta=0.1, delta=1.0),
        train=TrainConfig(epochs=10, slides_per_batch=4, steps_per_epoch=100, lr_sam=1e-3, lr_agent=1e-3,
                          lr_step_size=10, num_workers=2, sam_warmup_steps=200, attention_check_epoch=4),
    )


PRESETS = {"paper-her2": _paper_her2, "paper-mmr": _paper_mmr, "cpu-small": _cpu_small}


def preset(name: str, task: Task | None = None) -> DualAttentionConfig:
    """A fresh config for a named preset; ``task`` switches cpu-small between her2 and mmr."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; known: {', '.join(PRESETS)}")
    config = PRESETS[name]()
    if task is not None and task != config.task:
        config = dataclasses.replace(config, task=task)
        if task == "mmr":
            config = dataclasses.replace(
                config, soft_attention=dataclasses.replace(config.soft_attention, attention_mask="tumour"),
                sampler=dataclasses.replace(config.sampler, noise_low=-2.0, noise_high=1.0))
    return config.validate()
