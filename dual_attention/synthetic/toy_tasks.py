"""Small synthetic tasks that show the networks learn, shared by tests/test_learning.py (CI sizes) and
benchmarks/bench_learning.py (longer runs with figures). Pure numpy + torch, seeded.

- ``region_label_tiles``: tiles whose label is visible only inside one fixed corner region; the rest is
  label-free noise. An agent that scores them well must move its glimpses into that region.
- ``toy_slides``: slides with tissue, a tumour region and label-free normal tissue; the label shows only
  inside the tumour (its stain colour). Trained jointly (the agent reads tiles, the SAM learns from the
  agent's reward where it reads the label), the attention mass should move onto the tumour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dual_attention import losses
from dual_attention.config import DualAttentionConfig, preset
from dual_attention.models import DualAttentionModel, HardAttentionAgent, images_to_tensor

# -- agent: label visible only in one region ---------------------------------------------------------------

AGENT_TILE_PX = 64
LABEL_REGION_PX = 24  # the label shows in tile[:24, :24] (top-left corner), nowhere else
LABEL_COLOURS = np.array([[200, 40, 40], [40, 40, 200]], dtype=np.float64)  # class 0 red, class 1 blue


def agent_toy_config() -> DualAttentionConfig:
    """A 64² tile, 8² glimpses at two scales (the coarse one 16²): from the tile centre, neither scale
    sees the label region, so the glimpses must move up and left."""
    return preset("cpu-small", task="mmr").with_overrides({
        "tile.tile_level0_px": AGENT_TILE_PX, "agent.glimpse_px": 8, "agent.glimpse_scales": 2,
        "agent.n_glimpses": 3, "agent.glimpse_hidden": 32, "agent.hidden_size": 64, "agent.context_px": 16,
        "agent.location_std": 0.3,
    })


def region_label_tiles(n: int, rng: np.random.Generator, moving: bool = False
                       ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, 64, 64, 3) uint8 tiles and (n,) labels in {0, 1}: grey noise everywhere, and in the top-left
    24² corner a noisy patch of the label's colour. ``moving``: the patch sits in a random corner per tile
    (returned third, 0-3 = top-left, top-right, bottom-left, bottom-right), so that one path for every
    tile cannot read them all: the glimpses must follow the context."""
    labels = rng.integers(0, 2, size=n)
    corners = rng.integers(0, 4, size=n) if moving else np.zeros(n, np.int64)
    tiles = rng.normal(128, 30, size=(n, AGENT_TILE_PX, AGENT_TILE_PX, 3))
    patch = LABEL_COLOURS[labels][:, None, None, :] + rng.normal(0, 20, size=(n, LABEL_REGION_PX, LABEL_REGION_PX, 3))
    far = AGENT_TILE_PX - LABEL_REGION_PX
    for i, corner in enumerate(corners):
        r0, c0 = (far if corner >= 2 else 0), (far if corner % 2 else 0)
        tiles[i, r0:r0 + LABEL_REGION_PX, c0:c0 + LABEL_REGION_PX] = patch[i]
    out = np.clip(tiles, 0, 255).astype(np.uint8)
    return (out, labels, corners) if moving else (out, labels)


def glimpses_on_corner(locations_xy: np.ndarray, corners: np.ndarray, glimpse_px: int) -> np.ndarray:
    """(n, T) bool: does the finest glimpse overlap tile i's label patch in ``corners[i]``? Mirrors the
    locations into the top-left frame and asks ``glimpses_in_label_region``."""
    flipped = np.asarray(locations_xy, dtype=np.float64).copy()
    flipped[corners % 2 == 1, :, 0] *= -1
    flipped[corners >= 2, :, 1] *= -1
    return glimpses_in_label_region(flipped, glimpse_px)


def glimpses_in_label_region(locations_xy: np.ndarray, glimpse_px: int) -> np.ndarray:
    """Boolean per location: does the finest glimpse (side ``glimpse_px``) overlap the label region?"""
    centre_px = (locations_xy + 1.0) / 2.0 * AGENT_TILE_PX
    return np.all(centre_px - glimpse_px / 2 < LABEL_REGION_PX, axis=-1)


@dataclass
class AgentEvaluation:
    accuracy: float  # last-step accuracy, glimpsing at the policy means
    fraction_in_region: float  # of all glimpses, those overlapping the label region
    locations_xy: np.ndarray  # (n, T, 2) glimpse locations in [-1, 1]^2


def evaluate_agent(agent: HardAttentionAgent, tiles: np.ndarray, labels: np.ndarray, glimpse_px: int) -> AgentEvaluation:
    with torch.no_grad():
        output = agent(images_to_tensor(tiles), deterministic=True)
    predicted = output.class_log_probs[:, -1].argmax(1).numpy()
    locations = output.locations.numpy()
    return AgentEvaluation(
        accuracy=float((predicted == labels).mean()),
        fraction_in_region=float(glimpses_in_label_region(locations, glimpse_px).mean()),
        locations_xy=locations,
    )


def agent_step(agent: HardAttentionAgent, optimiser: torch.optim.Optimizer, tiles: np.ndarray, labels: np.ndarray,
               generator: torch.Generator, config: DualAttentionConfig) -> losses.AgentLosses:
    """One L_HA update of the agent alone on toy tiles."""
    output = agent(images_to_tensor(tiles), generator=generator)
    terms = losses.agent_losses(output.class_log_probs, output.log_pi, output.baselines, output.means,
                                torch.as_tensor(labels), config.agent.glimpse_px / AGENT_TILE_PX, config.loss.delta)
    optimiser.zero_grad()
    terms.l_ha.backward()
    optimiser.step()
    return terms


def train_agent_on_moving_region_task(steps: int, batch_size: int = 32, seed: int = 0
                                      ) -> tuple[AgentEvaluation, AgentEvaluation, np.ndarray]:
    """The agent alone on ``region_label_tiles(moving=True)``, the location std annealed as in training;
    returns (before, after, the eval tiles' corners). Evaluation glimpses first at the tile centre, from
    where no patch is visible, then at the policy means."""
    from dual_attention.training import location_std

    config = agent_toy_config().with_overrides({"agent.location_std": 0.1, "agent.location_std_start": 0.3,
                                                "agent.location_std_anneal_steps": steps // 2})
    torch.manual_seed(seed)
    agent = DualAttentionModel(config).agent
    rng = np.random.default_rng(seed)
    eval_tiles, eval_labels, eval_corners = region_label_tiles(256, np.random.default_rng(seed + 10_000), moving=True)
    before = evaluate_agent(agent, eval_tiles, eval_labels, config.agent.glimpse_px)
    optimiser = torch.optim.Adam(agent.parameters(), lr=config.train.lr_agent)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        tiles, labels, _ = region_label_tiles(batch_size, rng, moving=True)
        agent.location.std = location_std(config, step)
        agent_step(agent, optimiser, tiles, labels, generator, config)
    return before, evaluate_agent(agent, eval_tiles, eval_labels, config.agent.glimpse_px), eval_corners


def train_agent_on_region_task(steps: int, batch_size: int = 32, seed: int = 0, lr: float | None = None,
                               progress: bool = False) -> tuple[AgentEvaluation, AgentEvaluation, list[dict[str, float]]]:
    """Train the agent alone with L_HA (Adam, ``lr`` defaulting to the preset's ``train.lr_agent``);
    returns (before, after, per-step terms) on a fixed eval set."""
    config = agent_toy_config()
    lr = config.train.lr_agent if lr is None else lr
    torch.manual_seed(seed)
    agent = DualAttentionModel(config).agent
    rng = np.random.default_rng(seed)
    eval_tiles, eval_labels = region_label_tiles(256, np.random.default_rng(seed + 10_000))
    before = evaluate_agent(agent, eval_tiles, eval_labels, config.agent.glimpse_px)
    optimiser = torch.optim.Adam(agent.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    iterator = range(steps)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="agent toy task")
    for _ in iterator:
        tiles, labels = region_label_tiles(batch_size, rng)
        terms = agent_step(agent, optimiser, tiles, labels, generator, config)
        history.append({"l_ha": terms.l_ha.item(), "accuracy": terms.accuracy_last_step})
    after = evaluate_agent(agent, eval_tiles, eval_labels, config.agent.glimpse_px)
    return before, after, history


# -- soft attention: label visible only inside the tumour --------------------------------------------------

TOY_DOWNSAMPLE = 8
TOY_SLIDE_LEVEL0_PX = 256
TOY_TILE_LEVEL0_PX = 32
NORMAL_TISSUE_RGB = np.array([230.0, 170.0, 200.0])  # pink, label-free
BACKGROUND_RGB = np.array([245.0, 245.0, 245.0])
TUMOUR_STAIN_RGB = np.array([[60.0, 60.0, 170.0], [150.0, 80.0, 30.0]])  # class 0 blue, class 1 brown


def sam_toy_config() -> DualAttentionConfig:
    """256² slides, thumbnails at 1/8 (32²), 32² tiles (4² thumbnail pixels); joint training, L_SA after
    the agent's first ``train.sam_warmup_steps`` steps."""
    return preset("cpu-small", task="mmr").with_overrides({
        "slide.thumbnail_downsample": TOY_DOWNSAMPLE, "tile.tile_level0_px": TOY_TILE_LEVEL0_PX,
        "tile.feature_input_px": 32, "agent.glimpse_px": 8, "agent.context_px": 16, "agent.n_glimpses": 2,
        "soft_attention.attention_mask": "positive", "sampler.n_tiles": 4, "sampler.n_candidates": 8,
        "sampler.min_distance_thumb_px": 3.0, "train.mode": "joint", "train.epochs": 1,
        "train.sam_warmup_steps": 10, "loss.alpha_hold_epochs": 1,
    })


@dataclass
class ToySlide:
    level0_rgb: np.ndarray  # (256, 256, 3) uint8
    thumbnail: np.ndarray  # (32, 32, 3) uint8, block mean of level 0
    tissue_mask: np.ndarray  # (32, 32) bool
    tumour_mask: np.ndarray  # (32, 32) bool, inside tissue
    label: int

    def read_tiles(self, boxes) -> np.ndarray:
        return np.stack([self.level0_rgb[b.y0:b.y0 + b.height, b.x0:b.x0 + b.width] for b in boxes])


def toy_slide(label: int, rng: np.random.Generator) -> ToySlide:
    """Tissue: a rectangle covering most of the slide. Tumour: one square of 8-10 thumbnail pixels at a
    random place inside it, drawn at level 0 as a checkerboard of the label's stain colour and dark
    nuclei (so it looks darker at low power whatever the label); normal tissue is smooth pink."""
    side_thumb = TOY_SLIDE_LEVEL0_PX // TOY_DOWNSAMPLE
    tissue = np.zeros((side_thumb, side_thumb), bool)
    tissue[2:-2, 2:-2] = True
    tumour = np.zeros_like(tissue)
    size = int(rng.integers(8, 11))
    r0, c0 = rng.integers(2, side_thumb - 2 - size, size=2)
    tumour[r0:r0 + size, c0:c0 + size] = True
    level0_tissue = np.kron(tissue, np.ones((TOY_DOWNSAMPLE, TOY_DOWNSAMPLE), bool))
    level0_tumour = np.kron(tumour, np.ones((TOY_DOWNSAMPLE, TOY_DOWNSAMPLE), bool))
    image = np.broadcast_to(BACKGROUND_RGB, (TOY_SLIDE_LEVEL0_PX, TOY_SLIDE_LEVEL0_PX, 3)).copy()
    image[level0_tissue] = NORMAL_TISSUE_RGB
    yy, xx = np.mgrid[:TOY_SLIDE_LEVEL0_PX, :TOY_SLIDE_LEVEL0_PX]
    checker = ((yy // 2 + xx // 2) % 2 == 0)
    image[level0_tumour & checker] = TUMOUR_STAIN_RGB[label]
    image[level0_tumour & ~checker] = np.array([70.0, 40.0, 90.0])  # dark nuclei
    image += rng.normal(0, 8, size=image.shape)
    level0 = np.clip(image, 0, 255).astype(np.uint8)
    thumbnail = level0.reshape(side_thumb, TOY_DOWNSAMPLE, side_thumb, TOY_DOWNSAMPLE, 3).mean((1, 3))
    return ToySlide(level0, thumbnail.astype(np.uint8), tissue, tumour, int(label))


def tumour_attention_fraction(model: DualAttentionModel, slides: list[ToySlide]) -> float:
    """Mean over slides of the attention mass on tumour divided by the mass on tissue."""
    from dual_attention.pipeline import attention_map_of

    fractions = []
    with torch.no_grad():
        for slide in slides:
            attention = attention_map_of(model, slide.thumbnail, slide.tissue_mask).numpy()
            fractions.append(attention[slide.tumour_mask].sum() / attention[slide.tissue_mask].sum())
    return float(np.mean(fractions))


@dataclass
class TumourAttentionStats:
    mass_share: float  # attention mass on tumour / on tissue (mean over slides)
    pixel_auroc: float  # AUROC of attention values, tumour vs other tissue pixels (mean over slides)
    sampler_hit_rate: float  # share of propose_tiles centres (eval, seed 0) that lie on tumour


def tumour_attention_stats(model: DualAttentionModel, slides: list[ToySlide], config: DualAttentionConfig
                           ) -> TumourAttentionStats:
    """Three views of "attention on the tumour": its mass (what the entropy term fights), its ranking
    (what the paper's sampler uses, after min-max normalisation and thresholding), and the sampler's hits."""
    from sklearn.metrics import roc_auc_score

    from dual_attention.pipeline import attention_map_of, propose_tiles

    shares, aurocs, hits = [], [], []
    dims = (TOY_SLIDE_LEVEL0_PX, TOY_SLIDE_LEVEL0_PX)
    with torch.no_grad():
        for slide in slides:
            attention = attention_map_of(model, slide.thumbnail, slide.tissue_mask).numpy()
            shares.append(attention[slide.tumour_mask].sum() / attention[slide.tissue_mask].sum())
            tissue_values = attention[slide.tissue_mask]
            aurocs.append(roc_auc_score(slide.tumour_mask[slide.tissue_mask], tissue_values)
                          if np.ptp(tissue_values) > 0 else 0.5)
            proposal = propose_tiles(model, slide.thumbnail, slide.tissue_mask, dims, config, seed=0)
            rows, cols = proposal.centers_thumb_rc.T
            hits.extend(slide.tumour_mask[rows, cols].tolist())
    return TumourAttentionStats(float(np.mean(shares)), float(np.mean(aurocs)), float(np.mean(hits)))


def train_sam_on_toy_slides(steps: int, slides_per_batch: int = 8, seed: int = 0, lr: float = 3e-3,
                            beta: float | None = None, signal: str = "agent_reward", progress: bool = False
                            ) -> tuple[TumourAttentionStats, TumourAttentionStats, list[dict[str, float]],
                                       DualAttentionModel, list[ToySlide]]:
    """Train SAM and agent jointly through ``training.optimise`` (the training job's step), Adam at ``lr``
    for both halves (3x the preset's: CI-sized runs); ``signal`` is ``loss.sam_signal``.

    Returns (attention stats before, after, per-step terms, model, eval slides).
    """
    from dual_attention.training import SlideBatch, TrainingStep, build_optimizer, optimise

    config = sam_toy_config().with_overrides({"loss.sam_signal": signal, "train.lr_sam": lr, "train.lr_agent": lr})
    if beta is not None:
        config = config.with_overrides({"loss.beta": beta})
    torch.manual_seed(seed)
    model = DualAttentionModel(config)
    rng = np.random.default_rng(seed)
    eval_rng = np.random.default_rng(seed + 10_000)
    eval_slides = [toy_slide(i % 2, eval_rng) for i in range(16)]
    before = tumour_attention_stats(model, eval_slides, config)
    optimiser, _ = build_optimizer(model, config)
    step_module = TrainingStep(model, config)
    history: list[dict[str, float]] = []
    iterator = range(steps)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="SAM toy task")
    # A fixed pool of training slides, drawn from per step: generating slides costs more than a step.
    pool = [toy_slide(i % 2, rng) for i in range(4 * slides_per_batch)]
    for step in iterator:
        picked = rng.choice(len(pool), size=slides_per_batch, replace=False)
        slides = [pool[i] for i in picked]
        batch = SlideBatch([s.thumbnail for s in slides], [s.tissue_mask for s in slides], [s.label for s in slides],
                           [(TOY_SLIDE_LEVEL0_PX, TOY_SLIDE_LEVEL0_PX)] * len(slides), [s.read_tiles for s in slides],
                           tumour_masks=[s.tumour_mask for s in slides])
        history.append(optimise(step_module, model, optimiser, batch, 0, config, rng, step))
    after = tumour_attention_stats(model, eval_slides, config)
    return before, after, history, model, eval_slides
