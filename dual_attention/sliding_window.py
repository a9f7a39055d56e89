"""Sliding-window baseline: score every tissue patch of a slide with a ResNet18, aggregate the top k.

The exhaustive method the dual attention model is compared against (paper, Tables I-II):

1. a patch-selection mask on a low-power view of the slide: the tissue mask, intersected with a stain
   mask — DAB (``skimage.color.rgb2hed``'s DAB channel above a threshold; HER2 is a membrane DAB stain)
   or grayscale (darker than a threshold; for MMR, whose *loss* is the absence of DAB, a DAB mask would
   pick exactly the wrong regions);
2. a grid of non-overlapping patches of ``patch_px``² at ``magnification``, kept where the mask covers
   more than ``min_tissue_fraction`` (0.35) of the patch; if the stain mask leaves no patch (a HER2 0
   slide has no DAB), the tissue mask alone is used, and the score says so (``selection``);
3. a ResNet18 (defined here: torchvision cannot be installed beside the CPU torch 2.13 wheel, and no
   pretrained weights can be downloaded anyway) trained from scratch on patches of the training slides,
   each patch labelled with its slide's label;
4. slide score from the ``top_k`` (15) most confident patches: their class probabilities are averaged.

Everything here is Ray-free; ``jobs/baselines.py`` feeds it tiles through the Ray tile plane. Patches are
read through a ``ReadPatches`` callable, so the same code runs from a plain ``Slide`` in tests.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from skimage.color import rgb2gray, rgb2hed
from torch import nn
from tqdm import tqdm

from dual_attention.slides import Level0Box, Slide, tissue_mask

StainMask = Literal["dab", "gray", "none"]
# For ONE slide: (n, patch_px, patch_px, 3) uint8 patches of the given level-0 boxes, in order.
ReadPatches = Callable[[Sequence[Level0Box]], np.ndarray]


@dataclass(frozen=True)
class SlidingWindowConfig:
    patch_px: int = 224  # network input side
    magnification: float = 20.0  # patches are rendered at this magnification
    min_tissue_fraction: float = 0.35  # keep a patch when the selection mask covers more than this
    stain_mask: StainMask = "dab"
    dab_threshold: float = 0.03  # rgb2hed DAB optical density; faint brown ~0.05, glass/haematoxylin < 0.01
    gray_threshold: float = 0.8  # rgb2gray below this counts as stained
    mask_downsample: int = 32  # the selection mask is computed on the slide at 1/mask_downsample
    top_k: int = 15
    resnet_width: int = 64  # channels of the first stage (64 in the standard ResNet18)
    epochs: int = 3
    batch_size: int = 32
    learning_rate: float = 1e-3
    train_patches_per_slide: int = 48  # random patches per training slide (all patches is hours on CPU)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("patch_px", "magnification", "mask_downsample", "top_k", "resnet_width", "epochs",
                     "batch_size", "learning_rate", "train_patches_per_slide"):
            if not getattr(self, name) > 0:
                raise ValueError(f"sliding_window.{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.min_tissue_fraction < 1:
            raise ValueError(f"sliding_window.min_tissue_fraction must be in [0, 1), got {self.min_tissue_fraction}")
        if self.stain_mask not in ("dab", "gray", "none"):
            raise ValueError(f"sliding_window.stain_mask must be 'dab', 'gray' or 'none', got {self.stain_mask!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def patch_level0_px(self, objective_power: float) -> int:
        """Side of one patch in level-0 pixels: 224 px at 20x on a 40x slide is 448 level-0 px."""
        return max(1, round(self.patch_px * objective_power / self.magnification))


def paper_config(task: str) -> SlidingWindowConfig:
    """The paper's setting: 224² patches at 20x, top 15."""
    return SlidingWindowConfig(stain_mask="dab" if task == "her2" else "gray")


def cpu_small_config(task: str, seed: int = 0) -> SlidingWindowConfig:
    """CPU-sized: 64² patches at 20x (128 level-0 px on a 40x slide, the paper's magnification with a
    smaller field), the selection mask at 1/16, and a narrower ResNet18 (width 32, same layout) trained
    12 epochs on 64 patches per training slide: about a minute on one core for a few dozen slides."""
    return SlidingWindowConfig(
        patch_px=64, magnification=20.0, stain_mask="dab" if task == "her2" else "gray", mask_downsample=16,
        resnet_width=32, epochs=12, batch_size=32, train_patches_per_slide=64, seed=seed,
    )


# -- masks and patch selection ---------------------------------------------------------------------------


def dab_channel(rgb: np.ndarray) -> np.ndarray:
    """DAB optical density per pixel (colour deconvolution, Ruifrok & Johnston, via skimage)."""
    return rgb2hed(np.asarray(rgb))[..., 2]


def dab_mask(rgb: np.ndarray, threshold: float = 0.03) -> np.ndarray:
    """Pixels whose DAB optical density exceeds ``threshold``: the brown of an IHC stain."""
    return dab_channel(rgb) > threshold


def stain_mask(rgb: np.ndarray, config: SlidingWindowConfig) -> np.ndarray:
    if config.stain_mask == "dab":
        return dab_mask(rgb, config.dab_threshold)
    if config.stain_mask == "gray":
        return rgb2gray(np.asarray(rgb)) < config.gray_threshold
    return np.ones(np.asarray(rgb).shape[:2], dtype=bool)


@dataclass
class PatchGrid:
    level0_boxes: list[Level0Box]  # patches kept, row-major
    mask_fractions: np.ndarray  # (n,) fraction of each kept patch covered by the selection mask
    selection: str  # "tissue+dab", "tissue+gray", "tissue", or "tissue (no patch passed with dab)"
    patch_level0_px: int


def select_patches(
    selection_mask: np.ndarray, mask_downsample: int, patch_level0_px: int, level0_dims: tuple[int, int],
    min_fraction: float,
) -> tuple[list[Level0Box], np.ndarray]:
    """Non-overlapping grid patches (level 0) whose mask coverage exceeds ``min_fraction``.

    The mask is at 1/mask_downsample of level 0; a patch's coverage is the mean of the mask over the mask
    pixels its box spans (partially covered mask pixels count whole: the mask is coarse anyway).
    """
    width, height = level0_dims
    mask = np.asarray(selection_mask, dtype=bool)
    boxes: list[Level0Box] = []
    fractions: list[float] = []
    for y0 in range(0, height - patch_level0_px + 1, patch_level0_px):
        r0, r1 = y0 // mask_downsample, math.ceil((y0 + patch_level0_px) / mask_downsample)
        for x0 in range(0, width - patch_level0_px + 1, patch_level0_px):
            c0, c1 = x0 // mask_downsample, math.ceil((x0 + patch_level0_px) / mask_downsample)
            window = mask[r0:r1, c0:c1]
            fraction = float(window.mean()) if window.size else 0.0
            if fraction > min_fraction:
                boxes.append(Level0Box(x0, y0, patch_level0_px, patch_level0_px))
                fractions.append(fraction)
    return boxes, np.asarray(fractions, dtype=np.float64)


def patch_grid(
    low_power_rgb: np.ndarray, level0_dims: tuple[int, int], objective_power: float, config: SlidingWindowConfig,
    tissue: np.ndarray | None = None,
) -> PatchGrid:
    """Patches to score on one slide, from its view at 1/config.mask_downsample (``low_power_rgb``)."""
    tissue = tissue_mask(low_power_rgb, min_area_thumb_px=4) if tissue is None else np.asarray(tissue, dtype=bool)
    side = config.patch_level0_px(objective_power)
    args = (config.mask_downsample, side, level0_dims, config.min_tissue_fraction)
    if config.stain_mask != "none":
        boxes, fractions = select_patches(tissue & stain_mask(low_power_rgb, config), *args)
        if boxes:
            return PatchGrid(boxes, fractions, f"tissue+{config.stain_mask}", side)
        boxes, fractions = select_patches(tissue, *args)
        return PatchGrid(boxes, fractions, f"tissue (no patch passed with {config.stain_mask})", side)
    boxes, fractions = select_patches(tissue, *args)
    return PatchGrid(boxes, fractions, "tissue", side)


# -- ResNet18 ------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (He et al. 2016); a 1x1 conv matches shapes on stride 2."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """The standard ResNet18: 7x7 stem + max-pool, four stages of two BasicBlocks (width w, 2w, 4w, 8w),
    global average pool, linear classifier. ``width=64`` is the torchvision layout (11.2 M parameters at
    1000 classes); input (n, 3, H, W) float in [0, 1], any H, W >= 32."""

    def __init__(self, num_classes: int, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        stages: list[nn.Module] = []
        in_channels = width
        for i, channels in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            stages += [BasicBlock(in_channels, channels, stride), BasicBlock(channels, channels)]
            in_channels = channels
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stages(self.stem(x - 0.5))  # centre the [0, 1] input
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))


def patches_to_tensor(patches: np.ndarray) -> torch.Tensor:
    """(n, H, W, 3) uint8 -> (n, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(patches)).permute(0, 3, 1, 2).float().div_(255.0)


def _augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips and 90° rotations: stain patterns have no orientation."""
    if torch.rand(1, generator=generator).item() < 0.5:
        batch = batch.flip(3)
    turns = int(torch.randint(0, 4, (1,), generator=generator).item())
    return torch.rot90(batch, turns, dims=(2, 3))


def train_patch_classifier(
    patches: np.ndarray, labels: np.ndarray, num_classes: int, config: SlidingWindowConfig, progress: bool = True,
) -> tuple[ResNet18, list[float]]:
    """Train a ResNet18 from scratch on (n, H, W, 3) uint8 patches with per-patch labels (the slide label).

    Cross-entropy weighted by inverse class frequency (cohorts are rarely balanced in patches), Adam,
    seeded shuffling and augmentation. Returns the model in eval mode and the mean loss of each epoch.
    """
    patches = np.asarray(patches)
    labels = np.asarray(labels, dtype=np.int64)
    if patches.ndim != 4 or patches.shape[0] != labels.shape[0] or patches.shape[0] == 0:
        raise ValueError(f"need (n>0, H, W, 3) patches and n labels, got {patches.shape} and {labels.shape}")
    torch.manual_seed(config.seed)  # weight initialisation
    generator = torch.Generator().manual_seed(config.seed)
    model = ResNet18(num_classes, config.resnet_width)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    class_weights = torch.tensor(np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / num_classes, 0.0),
                                 dtype=torch.float32)
    inputs, targets = patches_to_tensor(patches), torch.from_numpy(labels)
    epoch_losses: list[float] = []
    model.train()
    for _ in tqdm(range(config.epochs), desc="sliding-window ResNet18", unit="epoch", disable=not progress):
        order = torch.randperm(len(targets), generator=generator)
        losses = []
        for start in range(0, len(order), config.batch_size):
            index = order[start:start + config.batch_size]
            if len(index) < 2:  # BatchNorm needs two samples
                continue
            logits = model(_augment(inputs[index], generator))
            loss = F.cross_entropy(logits, targets[index], weight=class_weights)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        epoch_losses.append(float(np.mean(losses)) if losses else float("nan"))
    return model.eval(), epoch_losses


@torch.no_grad()
def predict_patches(model: nn.Module, patches: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """(n, H, W, 3) uint8 -> (n, C) class probabilities."""
    model.eval()
    outputs = [F.softmax(model(patches_to_tensor(patches[i:i + batch_size])), dim=1)
               for i in range(0, len(patches), batch_size)]
    return torch.cat(outputs).numpy().astype(np.float64)


# -- aggregation and slide scoring ------------------------------------------------------------------------------


def top_k_aggregate(patch_probabilities: np.ndarray, top_k: int = 15) -> tuple[int, float, np.ndarray, np.ndarray]:
    """Slide score from the ``top_k`` most confident patches (highest maximum class probability): the mean
    of their probability vectors; class = its argmax, confidence = its maximum.

    Returns (class, confidence, slide probabilities, indices of the patches used, most confident first).
    """
    probs = np.asarray(patch_probabilities, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"need (n_patches >= 1, n_classes) probabilities, got shape {probs.shape}")
    order = np.argsort(-probs.max(axis=1), kind="stable")[:top_k]
    mean = probs[order].mean(axis=0)
    predicted = int(np.argmax(mean))
    return predicted, float(mean[predicted]), mean, order


@dataclass
class SlidingWindowScore:
    predicted_class: int
    class_probabilities: list[float]
    confidence: float
    n_patches: int
    selection: str
    top_patches: list[Level0Box]  # the top_k patches that made the score
    level0_pixels_read: int  # level-0 area of every patch read (the low-power mask view is not counted)
    fraction_level0_read: float
    timings_s: dict[str, float] = field(default_factory=dict)


def score_slide_sliding_window(
    model: nn.Module, low_power_rgb: np.ndarray, level0_dims: tuple[int, int], objective_power: float,
    read_patches: ReadPatches, config: SlidingWindowConfig, tissue: np.ndarray | None = None,
    chunk_patches: int = 256,
) -> SlidingWindowScore:
    """Score one slide: select patches on ``low_power_rgb`` (the slide at 1/config.mask_downsample), read
    them in chunks (bounded memory on a gigapixel slide) and aggregate the top k."""
    started = time.perf_counter()
    grid = patch_grid(low_power_rgb, level0_dims, objective_power, config, tissue)
    if not grid.level0_boxes:
        raise ValueError("no patch of the slide has tissue above sliding_window.min_tissue_fraction")
    selected = time.perf_counter()
    probabilities, read_s = [], 0.0
    for start in range(0, len(grid.level0_boxes), chunk_patches):
        t0 = time.perf_counter()
        patches = read_patches(grid.level0_boxes[start:start + chunk_patches])
        read_s += time.perf_counter() - t0
        probabilities.append(predict_patches(model, patches, config.batch_size))
    predicted, confidence, mean, used = top_k_aggregate(np.concatenate(probabilities), config.top_k)
    pixels = sum(box.area_level0_px for box in grid.level0_boxes)
    finished = time.perf_counter()
    return SlidingWindowScore(
        predicted_class=predicted,
        class_probabilities=mean.tolist(),
        confidence=confidence,
        n_patches=len(grid.level0_boxes),
        selection=grid.selection,
        top_patches=[grid.level0_boxes[i] for i in used],
        level0_pixels_read=pixels,
        fraction_level0_read=pixels / float(level0_dims[0] * level0_dims[1]),
        timings_s={"select_s": selected - started, "read_s": read_s,
                   "classify_s": finished - selected - read_s, "total_s": finished - started},
    )


def slide_patch_reader(slide: Slide, config: SlidingWindowConfig) -> ReadPatches:
    """A Ray-free ``ReadPatches`` for one open slide (tests, single-process runs)."""
    side = config.patch_px

    def read(boxes: Sequence[Level0Box]) -> np.ndarray:
        if not boxes:
            return np.zeros((0, side, side, 3), dtype=np.uint8)
        return slide.read_boxes(boxes, out_px=(side, side))

    return read


def sample_training_patches(
    grid: PatchGrid, read_patches: ReadPatches, n: int, rng: np.random.Generator
) -> np.ndarray:
    """Up to ``n`` patches of one training slide, drawn without replacement from its grid."""
    count = min(n, len(grid.level0_boxes))
    chosen = np.sort(rng.choice(len(grid.level0_boxes), size=count, replace=False))
    return read_patches([grid.level0_boxes[i] for i in chosen])
