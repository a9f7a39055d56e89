"""Networks: shapes, the attention distribution, the glimpse sensor's geometry, and where gradients flow."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dual_attention.config import preset
from dual_attention.models import (
    DualAttentionModel,
    GlimpseSensor,
    HardAttentionAgent,
    SoftAttentionNet,
    TileFeatureNet,
    images_to_tensor,
    inhibition_of_return,
)


def _conv_channels(module: nn.Module) -> list[int]:
    return [m.out_channels for m in module.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize(("name", "channels", "pool"), [
    ("paper-her2", [8, 16, 32, 64], 8),
    ("paper-mmr", [8, 16, 32, 64, 128], 3),
])
def test_soft_attention_presets_keep_thumbnail_resolution_and_sum_to_one(name, channels, pool) -> None:
    config = preset(name)
    net = SoftAttentionNet(config.soft_attention.conv_layers, config.soft_attention.base_channels,
                           config.soft_attention.pool_size)
    assert _conv_channels(net.features) == channels and net.pool_size == pool
    torch.manual_seed(0)
    nn.init.normal_(net.to_logit.weight)  # leave the uniform start so the map is not trivially flat
    thumbnail = torch.rand(1, 3, 37, 23)  # odd, non-square: 'same' padding must keep (37, 23)
    attention = net(thumbnail)
    assert attention.shape == (1, 37, 23)
    assert torch.all(attention >= 0)
    assert attention.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert attention.std().item() > 0


def test_soft_attention_starts_near_uniform_but_not_degenerate() -> None:
    config = preset("cpu-small")
    torch.manual_seed(0)
    net = SoftAttentionNet(config.soft_attention.conv_layers, config.soft_attention.base_channels,
                           config.soft_attention.pool_size)
    attention = net(torch.rand(1, 3, 12, 10))
    assert torch.allclose(attention, torch.full_like(attention, 1 / 120), rtol=0.05)
    # a gradient on the attention reaches the convolutions from the first step (zero head weights would not)
    attention[0, 0, 0].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.features.parameters())


@pytest.mark.parametrize("name", ["paper-her2", "cpu-small"])
def test_tile_feature_net_layers_and_shape(name) -> None:
    config = preset(name)
    net = TileFeatureNet(config.tile.feature_input_px, config.tile.feature_channels, config.tile.feature_layers)
    assert len(_conv_channels(net)) == config.tile.feature_layers
    features = net(torch.rand(3, 3, 256, 256))  # resized to feature_input_px inside
    assert features.shape == (3, config.tile.feature_channels)


def test_glimpse_sensor_crops_the_right_pixels() -> None:
    tile_px, glimpse_px = 32, 8
    tile = torch.arange(3 * tile_px * tile_px, dtype=torch.float32).reshape(1, 3, tile_px, tile_px)
    sensor = GlimpseSensor(glimpse_px, scales=2)
    glimpses = sensor(tile, torch.zeros(1, 2))
    assert glimpses.shape == (1, 6, glimpse_px, glimpse_px)
    # scale 0 at the centre: exactly the central 8x8 pixels
    assert torch.allclose(glimpses[0, :3], tile[0, :, 12:20, 12:20])
    # scale 1: the central 16x16 pixels averaged 2x2 (20x from 40x)
    pooled = torch.nn.functional.avg_pool2d(tile, 2)
    assert torch.allclose(glimpses[0, 3:], pooled[0, :, 4:12, 4:12])
    # x is the column, y the row: a glimpse at x = +0.5 (column 24), y = -0.5 (row 8)
    shifted = sensor(tile, torch.tensor([[0.5, -0.5]]))
    assert torch.allclose(shifted[0, :3], tile[0, :, 4:12, 20:28])
    # at the corner, the parts outside the tile read as zeros
    corner = sensor(tile, torch.tensor([[-1.0, -1.0]]))
    assert torch.all(corner[0, :3, :4, :] == 0) and torch.all(corner[0, :3, :, :4] == 0)
    assert torch.allclose(corner[0, :3, 4:, 4:], tile[0, :, :4, :4])


def test_inhibition_of_return_blacks_out_visited_areas_only() -> None:
    image = torch.ones(2, 3, 16, 16)
    out = inhibition_of_return(image, [torch.tensor([[0.0, 0.0], [-0.75, 0.75]])], box_fraction=0.25)
    # slide 0: a 4x4 square at the centre; slide 1: around column 2, row 14 (x=-0.75, y=+0.75)
    assert torch.all(out[0, :, 6:10, 6:10] == 0) and out[0].sum() == 3 * (256 - 16)
    assert torch.all(out[1, :, 12:16, 0:4] == 0) and out[1].sum() == 3 * (256 - 16)
    assert torch.equal(inhibition_of_return(image, [], 0.25), image)


def _small_agent(seed: int = 0) -> tuple[HardAttentionAgent, torch.Tensor]:
    config = preset("cpu-small")
    torch.manual_seed(seed)
    agent = DualAttentionModel(config).agent
    tiles = torch.rand(5, 3, config.tile.tile_level0_px, config.tile.tile_level0_px)
    return agent, tiles


def test_agent_output_shapes_and_detached_sample() -> None:
    agent, tiles = _small_agent()
    out = agent(tiles, generator=torch.Generator().manual_seed(1))
    t, c = agent.n_glimpses, 4
    assert out.class_log_probs.shape == (5, t, c)
    assert torch.allclose(out.class_log_probs.exp().sum(-1), torch.ones(5, t), atol=1e-5)
    assert out.log_pi.shape == (5, t) and out.baselines.shape == (5, t)
    assert out.locations.shape == out.means.shape == (5, t, 2)
    assert not out.locations.requires_grad, "the sampled location must carry no gradient"
    assert out.means.requires_grad and out.log_pi.requires_grad
    limit = 1 - agent.glimpse_px / tiles.shape[-1]  # the finest glimpse stays inside the tile
    assert torch.all(out.locations.abs() <= limit) and torch.all(out.means.abs() <= limit)


def test_agent_sampling_is_seeded_and_deterministic_mode_uses_means() -> None:
    agent, tiles = _small_agent()
    a = agent(tiles, generator=torch.Generator().manual_seed(3)).locations
    b = agent(tiles, generator=torch.Generator().manual_seed(3)).locations
    c = agent(tiles, generator=torch.Generator().manual_seed(4)).locations
    assert torch.equal(a, b) and not torch.equal(a, c)
    det = agent(tiles, deterministic=True)
    assert torch.equal(det.locations, det.means.detach())


def _grad_norms(module: nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_reinforce_term_trains_only_the_location_pathway() -> None:
    agent, tiles = _small_agent()
    out = agent(tiles, generator=torch.Generator().manual_seed(0))
    out.log_pi.sum().backward()
    assert _grad_norms(agent.location) > 0 and _grad_norms(agent.context) > 0 and _grad_norms(agent.core.top) > 0
    # the classifier pathway gets nothing from log pi: the top layer reads a detached bottom state
    assert _grad_norms(agent.glimpse) == 0 and _grad_norms(agent.core.bottom) == 0
    assert _grad_norms(agent.classifier) == 0


def test_classification_loss_does_not_reach_the_policy() -> None:
    agent, tiles = _small_agent()
    out = agent(tiles, generator=torch.Generator().manual_seed(0))
    out.class_log_probs.sum().backward()
    assert _grad_norms(agent.glimpse) > 0 and _grad_norms(agent.classifier) > 0
    # the glimpse is taken at the detached sample, so no path leads back to the location network
    assert _grad_norms(agent.location) == 0 and _grad_norms(agent.context) == 0


def test_baseline_is_trained_by_its_own_loss_only() -> None:
    agent, tiles = _small_agent()
    out = agent(tiles, generator=torch.Generator().manual_seed(0))
    out.baselines.sum().backward()
    assert _grad_norms(agent.baseline) > 0
    assert _grad_norms(agent.core.bottom) == 0 and _grad_norms(agent.glimpse) == 0


def test_model_parameter_groups_partition_the_model() -> None:
    model = DualAttentionModel(preset("cpu-small"))
    sam = {id(p) for p in model.sam_parameters()}
    agent = {id(p) for p in model.agent_parameters()}
    assert not sam & agent
    assert sam | agent == {id(p) for p in model.parameters()}


def test_images_to_tensor_checks_shape() -> None:
    tensor = images_to_tensor(np.full((2, 4, 5, 3), 255, np.uint8))
    assert tensor.shape == (2, 3, 4, 5) and float(tensor.max()) == 1.0
    with pytest.raises(ValueError, match="RGB"):
        images_to_tensor(np.zeros((2, 4, 5), np.uint8)[None])


def test_soft_attention_with_a_tissue_mask_is_zero_off_tissue() -> None:
    config = preset("cpu-small")
    net = SoftAttentionNet(config.soft_attention.conv_layers, config.soft_attention.base_channels,
                           config.soft_attention.pool_size)
    nn.init.normal_(net.to_logit.weight)
    mask = torch.zeros(2, 9, 11, dtype=torch.bool)
    mask[0, 2:5, 3:8] = True  # slide 1 has no tissue: it keeps all its pixels
    attention = net(torch.rand(2, 3, 9, 11), mask)
    assert torch.all(attention[0][~mask[0]] == 0) and torch.all(attention[0][mask[0]] > 0)
    assert attention[0].sum().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.all(attention[1] > 0) and attention[1].sum().item() == pytest.approx(1.0, abs=1e-5)
