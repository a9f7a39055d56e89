"""Tests of `dual-attention tune`: the search space's checks, and searches over the real training job."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dual_attention.config import ConfigError, preset
from tune.space import NOISE_WIDTH, SearchSpaceError, load_space, space_from_dict

# -- the search space (no Ray) ------------------------------------------------------------------------------


@pytest.mark.parametrize("preset_name", ["paper-her2", "paper-mmr", "cpu-small"])
def test_default_space_is_centred_on_the_presets_values(preset_name: str) -> None:
    base = preset(preset_name)
    space = load_space(None, base)
    centre = space.centre()
    assert centre["loss.alpha"] == base.loss.alpha
    assert centre["loss.delta"] == base.loss.delta
    assert centre["sampler.noise_low"] == base.sampler.noise_low
    assert centre["sampler.noise_low"] + centre[NOISE_WIDTH] == base.sampler.noise_high
    assert space.centre_inside()
    assert space.trial_config(centre).to_dict() == base.to_dict()


def test_noise_high_is_above_low_by_construction() -> None:
    space = load_space(None, preset("cpu-small"))
    low_dim, width_dim = space.dimension("sampler.noise_low"), space.dimension(NOISE_WIDTH)
    for low in (low_dim.low, low_dim.high):
        for width in (width_dim.low, width_dim.high):
            config = space.trial_config({**space.centre(), "sampler.noise_low": low, NOISE_WIDTH: width})
            assert config.sampler.noise_high == pytest.approx(low + width)
            assert config.sampler.noise_high > config.sampler.noise_low


def test_searched_n_tiles_brings_candidates_along() -> None:
    space = space_from_dict({"sampler.n_tiles": {"sample": "choice", "values": [2, 6]}}, preset("cpu-small"))
    config = space.trial_config({"sampler.n_tiles": 6})
    assert (config.sampler.n_tiles, config.sampler.n_candidates) == (6, 12)


@pytest.mark.parametrize(
    ("entries", "named"),
    [
        ({"loss.alpha": {"sample": "uniform", "low": 0.5, "high": 1.2}}, "loss.alpha"),
        ({"loss.alpha": {"sample": "uniform", "low": 0.0, "high": 0.9}}, "loss.alpha"),
        ({"loss.alpha": {"sample": "uniform", "low": 0.6, "high": 0.6}}, "loss.alpha"),
        ({"loss.delta": {"sample": "loguniform", "low": 2.0, "high": 1.0}}, "loss.delta"),
        ({"loss.delta": {"sample": "uniform", "low": -1.0, "high": 1.0}}, "loss.delta"),
        ({"train.lr_sam": {"sample": "loguniform", "low": 0.0, "high": 0.1}}, "train.lr_sam"),
        ({"sampler.noise_width": {"sample": "uniform", "low": 0.0, "high": 1.0}}, "sampler.noise_width"),
        (
            {
                "sampler.noise_low": {"sample": "uniform", "low": -1.0, "high": 0.5},
                "sampler.noise_high": {"sample": "uniform", "low": 0.2, "high": 1.0},
            },
            "sampler.noise_high",
        ),
        ({"sampler.noise_low": {"sample": "uniform", "low": 0.0, "high": 1.5}}, "sampler.noise_low"),
        ({"agent.n_glimpses": {"sample": "int", "low": 0, "high": 4}}, "agent.n_glimpses"),
        ({"agent.n_glimpses": {"sample": "int", "low": 1.5, "high": 4}}, "agent.n_glimpses"),
        ({"loss.gamma": {"sample": "uniform", "low": 0.1, "high": 0.2}}, "loss.gamma"),
        ({"loss.alpha": {"sample": "normal", "low": 0.1, "high": 0.2}}, "loss.alpha"),
        ({"sampler.n_tiles": {"sample": "choice", "values": []}}, "sampler.n_tiles"),
    ],
)
def test_invalid_space_is_refused_naming_the_field(entries: dict, named: str, tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(entries))
    with pytest.raises(SearchSpaceError, match=named.replace(".", r"\.")) as caught:
        load_space(path, preset("cpu-small"))
    assert str(path) in str(caught.value)
    assert isinstance(caught.value, ConfigError)


def test_unreadable_space_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SearchSpaceError, match="missing.yaml"):
        load_space(tmp_path / "missing.yaml", preset("cpu-small"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("loss.alpha: [unclosed\n")
    with pytest.raises(SearchSpaceError, match="broken.yaml"):
        load_space(broken, preset("cpu-small"))
