"""The search space of `dual-attention tune`: which config fields vary, over what range, how sampled.

A space is declared in YAML (``tune/default_space.yaml``), one entry per config field in
``section.field`` form::

    loss.alpha: {sample: uniform, low: 0.1, high: 0.95}
    loss.delta: {sample: loguniform, low: 0.1, high: 10.0}
    sampler.noise_low: {sample: uniform, low: -2.5, high: 0.5}
    sampler.noise_width: {sample: loguniform, low: 0.5, high: 4.0}
    agent.n_glimpses: {sample: int, low: 2, high: 8}
    sampler.n_tiles: {sample: choice, values: [4, 6, 8]}

The noise range is searched as a low end and a positive width (``sampler.noise_width`` is not a config
field: ``noise_high = noise_low + noise_width``), so every trial has high > low by construction. A space
may instead declare ``sampler.noise_high`` directly, but only with a range lying wholly above that of
``sampler.noise_low``, for the same guarantee. When ``sampler.n_tiles`` is searched and
``sampler.n_candidates`` is not, the candidates follow the paper's rule of 2N.

Everything is checked before any trial starts (``SearchSpace.validate``): the bounds of each entry, and
the base config with each entry at its low and at its high end through the config's own validation, so
that a range the training job would refuse (alpha outside (0, 1], a negative delta) is refused here,
naming the field. The base config's values (the paper's, for the paper presets) are the space's centre:
the search evaluates them first, as the reference every other trial is compared with.

No Ray here: the space hands Tune its domains through ``to_tune`` (imported lazily).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from dual_attention.config import ConfigError, DualAttentionConfig

Sampling = Literal["uniform", "loguniform", "int", "choice"]
SAMPLINGS: tuple[str, ...] = ("uniform", "loguniform", "int", "choice")

NOISE_WIDTH = "sampler.noise_width"  # derived entry: noise_high = noise_low + noise_width
DEFAULT_SPACE_PATH = Path(__file__).with_name("default_space.yaml")


class SearchSpaceError(ConfigError):
    """A search space is refused before any trial starts; the message names the source and the field."""


@dataclass(frozen=True)
class Dimension:
    """One searched config field: ``name`` is ``section.field`` (or ``sampler.noise_width``)."""

    name: str
    sampling: Sampling
    low: float | None = None  # uniform, loguniform, int (inclusive)
    high: float | None = None
    values: tuple[Any, ...] = ()  # choice

    def extremes(self) -> tuple[Any, ...]:
        """The values at the ends of the range; with the config's checks, they bound every sample."""
        if self.sampling == "choice":
            return self.values
        return (self.low, self.high)

    def contains(self, value: Any) -> bool:
        if self.sampling == "choice":
            return value in self.values
        assert self.low is not None and self.high is not None
        return self.low <= value <= self.high

    def to_tune(self) -> Any:
        from ray import tune

        if self.sampling == "uniform":
            return tune.uniform(self.low, self.high)
        if self.sampling == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.sampling == "int":
            return tune.randint(int(self.low), int(self.high) + 1)  # randint's upper end is exclusive
        return tune.choice(list(self.values))


@dataclass(frozen=True)
class SearchSpace:
    """The searched dimensions, the base config they vary, and where the declaration came from."""

    dimensions: tuple[Dimension, ...]
    base: DualAttentionConfig
    source: str = "<search space>"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.dimensions)

    def dimension(self, name: str) -> Dimension | None:
        return next((d for d in self.dimensions if d.name == name), None)

    # -- from a trial's sampled values to the training job's config ---------------------------------------
    def overrides(self, sampled: dict[str, Any]) -> dict[str, Any]:
        """Config overrides (``{"loss.alpha": 0.7, ...}``) for one trial's sampled values."""
        missing = [name for name in self.names if name not in sampled]
        if missing:
            raise SearchSpaceError(f"{self.source}: trial config lacks {', '.join(missing)}")
        overrides = {name: sampled[name] for name in self.names if name != NOISE_WIDTH}
        if NOISE_WIDTH in sampled:
            low = sampled.get("sampler.noise_low", self.base.sampler.noise_low)
            overrides["sampler.noise_high"] = float(low) + float(sampled[NOISE_WIDTH])
        if "sampler.n_tiles" in overrides and "sampler.n_candidates" not in overrides:
            overrides["sampler.n_candidates"] = 2 * int(overrides["sampler.n_tiles"])
        for name, dim in zip(self.names, self.dimensions, strict=True):
            if dim.sampling == "int" and name in overrides:
                overrides[name] = int(overrides[name])
        return overrides

    def trial_config(self, sampled: dict[str, Any]) -> DualAttentionConfig:
        """The full config of one trial; the config's validation names any refused field."""
        return self.base.with_overrides(self.overrides(sampled))

    # -- the centre: the base config's values ------------------------------------------------------------
    def centre(self) -> dict[str, Any]:
        """The base config's value of every dimension (the paper's values for the paper presets)."""
        base = self.base.to_dict()
        centre: dict[str, Any] = {}
        for name in self.names:
            if name == NOISE_WIDTH:
                centre[name] = self.base.sampler.noise_high - self.base.sampler.noise_low
            else:
                section, field_name = name.split(".", 1)
                centre[name] = base[section][field_name]
        return centre

    def centre_inside(self) -> bool:
        centre = self.centre()
        return all(dim.contains(centre[dim.name]) for dim in self.dimensions)

    def to_tune(self) -> dict[str, Any]:
        """Tune's ``param_space``: one domain per dimension, keyed by the dotted name."""
        return {dim.name: dim.to_tune() for dim in self.dimensions}

    # -- checks before any trial -------------------------------------------------------------------------
    def validate(self) -> SearchSpace:
        if not self.dimensions:
            raise SearchSpaceError(f"{self.source}: the search space declares no dimension")
        names = self.names
        if NOISE_WIDTH in names and "sampler.noise_high" in names:
            raise SearchSpaceError(
                f"{self.source}: declare either sampler.noise_width or sampler.noise_high, not both"
            )
        self._check_noise_range()
        # Each end of each range through the config's own validation (which names the field): a corner
        # the training job would refuse is refused now, before a trial is spent on it.
        centre = self.centre()
        for dim in self.dimensions:
            for value in dim.extremes():
                sampled = dict(centre, **{dim.name: value})
                try:
                    self.trial_config(sampled)
                except SearchSpaceError:
                    raise
                except ConfigError as error:
                    raise SearchSpaceError(f"{self.source}: {dim.name} = {value!r} is refused: {error}") from None
        return self

    def _check_noise_range(self) -> None:
        low_dim = self.dimension("sampler.noise_low")
        width_dim = self.dimension(NOISE_WIDTH)
        high_dim = self.dimension("sampler.noise_high")
        if width_dim is not None and min(width_dim.extremes()) <= 0:
            raise SearchSpaceError(
                f"{self.source}: {NOISE_WIDTH} must be > 0 over its whole range (noise_high = noise_low + "
                f"width must exceed noise_low), got low {min(width_dim.extremes())!r}"
            )
        if high_dim is not None:
            highest_low = max(low_dim.extremes()) if low_dim is not None else self.base.sampler.noise_low
            lowest_high = min(high_dim.extremes())
            if not lowest_high > highest_low:
                raise SearchSpaceError(
                    f"{self.source}: sampler.noise_high must exceed sampler.noise_low in every trial: its "
                    f"lowest value {lowest_high!r} is not above the highest noise_low {highest_low!r} "
                    f"(declare sampler.noise_width instead to search a range above noise_low)"
                )
        if low_dim is not None and width_dim is None and high_dim is None:
            highest_low = max(low_dim.extremes())
            if not self.base.sampler.noise_high > highest_low:
                raise SearchSpaceError(
                    f"{self.source}: sampler.noise_low reaches {highest_low!r}, not below the base config's "
                    f"sampler.noise_high {self.base.sampler.noise_high!r}; search sampler.noise_width too"
                )


def parse_dimension(name: str, spec: Any, source: str) -> Dimension:
    """One YAML entry to a Dimension, refusing malformed bounds by name."""
    where = f"{source}: {name}"
    if not isinstance(spec, dict):
        raise SearchSpaceError(f"{where}: expected a mapping such as {{sample: uniform, low: 0.1, high: 0.9}}")
    unknown = set(spec) - {"sample", "low", "high", "values"}
    if unknown:
        raise SearchSpaceError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    sampling = spec.get("sample")
    if sampling not in SAMPLINGS:
        raise SearchSpaceError(f"{where}: sample must be one of {SAMPLINGS}, got {sampling!r}")
    if sampling == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise SearchSpaceError(f"{where}: a choice needs a non-empty list 'values'")
        if "low" in spec or "high" in spec:
            raise SearchSpaceError(f"{where}: a choice takes 'values', not 'low'/'high'")
        return Dimension(name, "choice", values=tuple(values))
    if "values" in spec:
        raise SearchSpaceError(f"{where}: '{sampling}' takes 'low' and 'high', not 'values'")
    bounds: dict[str, float] = {}
    for key in ("low", "high"):
        value = spec.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise SearchSpaceError(f"{where}: '{key}' must be a finite number, got {value!r}")
        if sampling == "int" and not float(value).is_integer():
            raise SearchSpaceError(f"{where}: '{key}' of an int range must be a whole number, got {value!r}")
        bounds[key] = value
    low, high = bounds["low"], bounds["high"]
    if not high > low:
        raise SearchSpaceError(f"{where}: high ({high!r}) must be greater than low ({low!r})")
    if sampling == "loguniform" and not low > 0:
        raise SearchSpaceError(f"{where}: a loguniform range needs low > 0, got {low!r}")
    if sampling == "int":
        return Dimension(name, "int", low=int(low), high=int(high))
    return Dimension(name, sampling, low=float(low), high=float(high))


def space_from_dict(data: Any, base: DualAttentionConfig, source: str = "<search space>") -> SearchSpace:
    """Build and validate a space from its YAML mapping; unknown config fields are refused by name."""
    if not isinstance(data, dict):
        raise SearchSpaceError(f"{source}: a search space must be a mapping of config fields to ranges")
    base_fields = base.to_dict()
    dimensions = []
    for name, spec in data.items():
        if not isinstance(name, str) or "." not in name:
            raise SearchSpaceError(f"{source}: entry {name!r} is not a config field of the form section.field")
        section, field_name = name.split(".", 1)
        is_field = isinstance(base_fields.get(section), dict) and field_name in base_fields[section]
        if name != NOISE_WIDTH and not is_field:
            raise SearchSpaceError(f"{source}: unknown config field: {name}")
        dimensions.append(parse_dimension(name, spec, source))
    return SearchSpace(tuple(dimensions), base, source).validate()


def load_space(path: str | Path | None, base: DualAttentionConfig) -> SearchSpace:
    """Read a space's YAML (the default space when ``path`` is None) and validate it against ``base``."""
    path = Path(path) if path is not None else DEFAULT_SPACE_PATH
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise SearchSpaceError(f"search space {path}: cannot read: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise SearchSpaceError(f"search space {path}: not valid YAML: {error}") from None
    return space_from_dict(data, base, source=f"search space {path}")
