"""The GPU path of the core: scoring and training with the model on a CUDA device. Skipped where torch
sees no GPU (this project's CI); run on a GPU machine with

    python -m pytest -q tests/test_gpu.py

Scoring builds its inputs on the CPU and moves them to the model's device (``pipeline.model_device``);
results come back to the CPU. These tests pin that a GPU model scores a slide as the same model on the CPU
does, and that training steps run, and learn, with every parameter and gradient on the GPU.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from test_pipeline import ArraySlide

from dual_attention.config import preset
from dual_attention.models import DualAttentionModel
from dual_attention.pipeline import score_slide
from dual_attention.training import SlideBatch, TrainingStep, build_optimizer, optimise

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU path is not run")

CUDA = torch.device("cuda")


def _models() -> tuple[DualAttentionModel, DualAttentionModel]:
    config = preset("cpu-small")
    torch.manual_seed(0)
    cpu_model = DualAttentionModel(config).eval()
    torch.nn.init.normal_(cpu_model.soft_attention.to_logit.weight, std=0.5)  # a map with contrast to sample
    return cpu_model, copy.deepcopy(cpu_model).to(CUDA)


def test_a_gpu_model_scores_a_slide_as_the_cpu_model_does() -> None:
    config = preset("cpu-small")
    cpu_model, gpu_model = _models()
    for seed in range(3):
        slide = ArraySlide(seed)
        on_cpu = score_slide(cpu_model, slide.thumbnail, slide.tissue, slide.dims, slide.read_tiles, config, seed)
        on_gpu = score_slide(gpu_model, slide.thumbnail, slide.tissue, slide.dims, slide.read_tiles, config, seed)
        assert [t.level0_box for t in on_gpu.tiles] == [t.level0_box for t in on_cpu.tiles]
        assert on_gpu.predicted_class == on_cpu.predicted_class
        np.testing.assert_allclose(on_gpu.class_probabilities, on_cpu.class_probabilities, atol=1e-4)
        np.testing.assert_allclose(on_gpu.attention_map, on_cpu.attention_map, rtol=1e-3, atol=1e-7)
        for gpu_tile, cpu_tile in zip(on_gpu.tiles, on_cpu.tiles, strict=True):
            np.testing.assert_allclose(gpu_tile.glimpse_trail_level0, cpu_tile.glimpse_trail_level0, atol=1e-2)


def test_serves_hard_stage_on_a_gpu_scores_a_batch_with_another_glimpse_count_as_the_cpu() -> None:
    """What the hard-attention replica runs on a GPU: ``score_tiles`` over serve's view of the model with
    another glimpse count (``serve.stages._with_glimpses``), the pipeline moving tensors to the agent's device."""
    from dual_attention.pipeline import TileProposal, score_tiles
    from dual_attention.slides import Level0Box
    from serve.stages import _with_glimpses

    config = preset("cpu-small")
    cpu_model, gpu_model = _models()
    size = config.tile.tile_level0_px
    tiles = np.random.default_rng(0).integers(0, 256, size=(3, size, size, 3), dtype=np.uint8)
    proposal = TileProposal(level0_boxes=[Level0Box(i * size, 0, size, size) for i in range(3)],
                            attention_weights=np.array([0.5, 0.3, 0.2]), attention_map=np.zeros((0, 0)),
                            centers_thumb_rc=np.zeros((3, 2), int), shortfall_reason=None)
    glimpses = cpu_model.agent.n_glimpses + 2
    on_cpu = score_tiles(_with_glimpses(cpu_model, glimpses), tiles, proposal, config, seed=0)
    on_gpu = score_tiles(_with_glimpses(gpu_model, glimpses), tiles, proposal, config, seed=0)
    assert all(len(t.glimpse_trail_level0) == glimpses for t in on_gpu)
    for gpu_tile, cpu_tile in zip(on_gpu, on_cpu, strict=True):
        np.testing.assert_allclose(gpu_tile.class_probabilities, cpu_tile.class_probabilities, atol=1e-4)
        np.testing.assert_allclose(gpu_tile.glimpse_trail_level0, cpu_tile.glimpse_trail_level0, atol=1e-2)


def test_training_steps_run_on_the_gpu_and_lower_the_agent_loss() -> None:
    config = preset("cpu-small").with_overrides({"train.sam_warmup_steps": 0, "loss.alpha_hold_epochs": 0})
    torch.manual_seed(0)
    model = DualAttentionModel(config).to(CUDA).train()
    optimizer, _ = build_optimizer(model, config)
    step_module = TrainingStep(model, config)
    slides = [ArraySlide(20 + i, label=i % 4) for i in range(4)]
    # the label as a tint of the tissue, so that the agent has something to learn in a few steps
    for slide in slides:
        slide.level0[128:896, 192:1344, slide.label % 3] = 230
        slide.thumbnail[4:28, 6:42, slide.label % 3] = 230
    batch = SlideBatch([s.thumbnail for s in slides], [s.tissue for s in slides], [s.label for s in slides],
                       [s.dims for s in slides], [s.read_tiles for s in slides])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    nll = []
    for step in range(30):
        terms = optimise(step_module, model, optimizer, batch, 0, config, np.random.default_rng(step), step)
        assert math.isfinite(terms["l_j"]) and math.isfinite(terms["l_sa"])
        nll.append(terms["nll"])
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert all(state.device.type == "cuda" for group in optimizer.state.values() for state in group.values()
               if isinstance(state, torch.Tensor) and state.ndim > 0)
    moved = [name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert any(name.startswith("soft_attention.") for name in moved) and any(name.startswith("agent.") for name in moved)
    assert np.mean(nll[-5:]) < np.mean(nll[:5]), f"the agent's NLL did not fall on the GPU: {nll}"
