"""The dual attention model's networks, one small class per role.

Soft attention (low power, whole thumbnail):

Every network starts with ``Standardise`` (pixels centred and scaled, fixed constants).

- ``SoftAttentionNet``: a CNN over the thumbnail giving a softmax distribution over its pixels. Convs use
  'same' padding and the max-pool has stride 1, so the attention map keeps the thumbnail's resolution.
  Inference computes its logits in tiles with a receptive-field halo (``tiled_logits``: memory bounded by
  the tile, same values); training back-propagates through the one-pass ``logits``.
- ``TileFeatureNet`` (f_f): a small residual network over one sampled tile, resized to
  ``config.tile.feature_input_px``; its features enter the attention-sampling expectation.
- ``SamHead``: a linear classifier over the expected tile features (the SAM's own task loss).

Hard attention (high power, one tile at a time; after kevinzakka/recurrent-visual-attention and DRAM):

- ``GlimpseSensor``: ``glimpse_scales`` square crops around a location in [-1, 1]^2, scale k covering
  ``glimpse_px * 2**k`` level-0 pixels (40x, 20x, ...), all resized to ``glimpse_px``.
- ``GlimpseNetwork``: v = relu(CNN(glimpses)) * Linear(location)  (what ⊙ where).
- ``CoreNetwork``: two stacked LSTM cells. The bottom one (``hidden_size``) reads glimpses and feeds the
  classifier and the baseline; the top one (``hidden_size // 2``) is started from the context features and
  drives the location policy (DRAM's split, so the context never leaks the label to the classifier).
- ``ContextNetwork``: a CNN over the tile downscaled to ``context_px`` in which the finest-scale area of
  every visited glimpse is blacked out (inhibition of return).
- ``LocationNetwork``: mean = (1 - glimpse/tile)·tanh(Linear(h_top ⊙ context)), so the finest glimpse
  stays inside the tile; a Gaussian whose std the training loop anneals (``std`` is an attribute). The
  sampled location is detached: the policy is trained by REINFORCE (log-probability) only.
- ``agent.relative_moves``: each later glimpse is a move from the previous one (a saccade), not an
  absolute position. On tiles where every place carries the same evidence the reward does not depend
  on where the agent looks, and absolute means drifted to one place for every tile (the trails
  collapsed, measured); moves from a random start keep the trails apart while the policy still chooses
  the direction and length of each move.
- The first glimpse is drawn uniformly over the tile (the paper's random first glimpse,
  ``agent.first_glimpse="random"``): it is no policy action (log-probability 0), and it spreads the
  episodes over the tile so that the policy cannot collapse onto one path for every tile.
- ``ClassifierNetwork``, ``BaselineNetwork``: per-step class log-probabilities and the REINFORCE baseline.

Location convention: (x, y) in [-1, 1]^2 as in ``torch.nn.functional.affine_grid`` with
``align_corners=False``: -1 is the left/top edge of the tile, +1 its right/bottom edge.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dual_attention.config import DualAttentionConfig

# -- image conversion --------------------------------------------------------------------------------------


def images_to_tensor(images_uint8: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(n, h, w, 3) or (h, w, 3) uint8 array -> (n, 3, h, w) float32 in [0, 1]."""
    if isinstance(images_uint8, np.ndarray) and not images_uint8.flags.writeable:
        images_uint8 = images_uint8.copy()  # torch refuses to wrap read-only memory (OpenSlide reads)
    tensor = torch.as_tensor(images_uint8)
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 4 or tensor.shape[-1] != 3:
        raise ValueError(f"expected (n, h, w, 3) RGB images, got shape {tuple(tensor.shape)}")
    # One converting copy into NCHW, then an in-place divide: the same values as
    # ``permute().float().div(255).contiguous()`` in 2 passes over the pixels instead of 3 (a paper-size slide
    # has 10 tiles of 2048²: 0.35 -> 0.14 CPU-s for 5 of them, measured).
    out = torch.empty((tensor.shape[0], 3, tensor.shape[1], tensor.shape[2]), dtype=torch.float32,
                      device=tensor.device)
    out.copy_(tensor.permute(0, 3, 1, 2))
    return out.div_(255.0)


class Standardise(nn.Module):
    """Pixels in [0, 1] -> (x - 0.5) / 0.25, the first step of every network here. Slide pixels sit in
    0.5-0.95 (bright glass and pale stain): fed raw, convolutions with small initial weights see an almost
    constant positive input and the agent took ~600 updates to read tumour tiles that it reads in ~200
    once centred (measured, benchmarks/RESULTS.md). Fixed constants, no statistics: nothing to fit or store."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - 0.5) * 4.0


# -- soft attention ----------------------------------------------------------------------------------------


class SoftAttentionNet(nn.Module):
    """Thumbnail (B, 3, H, W) -> attention (B, H, W), a softmax over the H*W pixels.

    With a tissue mask the softmax runs over tissue pixels only (zero elsewhere): tiles are only ever
    sampled on tissue, and without the mask the map is free to park its mass on background, e.g. on the
    zero-padded border, which then says nothing about the slide.
    """

    def __init__(self, conv_layers: int, base_channels: int, pool_size: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [Standardise()]
        in_channels = 3
        for i in range(conv_layers):
            out_channels = base_channels * 2**i
            layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU()]
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.conv_layers = conv_layers
        self.pool_size = pool_size
        self.to_logit = nn.Conv2d(in_channels, 1, 1)
        # Start near-uniform, so that the first tiles are drawn from all tissue, but not exactly: with zero
        # weights the convolutions below get no gradient until the head has moved (a degenerate start).
        nn.init.normal_(self.to_logit.weight, std=1e-2)
        nn.init.zeros_(self.to_logit.bias)

    def logits(self, thumbnail: torch.Tensor) -> torch.Tensor:
        features = self.features(thumbnail)
        # 'same' stride-1 max-pool, also for even kernels (HER2 uses 8): pad (k-1)//2 before, k//2 after.
        k = self.pool_size
        padded = F.pad(features, ((k - 1) // 2, k // 2, (k - 1) // 2, k // 2), value=float("-inf"))
        pooled = F.max_pool2d(padded, k, stride=1)
        return self.to_logit(pooled)[:, 0]  # (B, H, W)

    # Inference runs its activations channels-last and its max-pool as running maxima (see
    # ``_inference_logits``); class attributes so that benchmarks/bench_slide_cost.py can measure each.
    inference_channels_last = True
    inference_running_max = True

    def _inference_logits(self, thumbnail: torch.Tensor) -> torch.Tensor:
        """``logits`` by a faster route for inference, same values: channels-last activations and the
        stride-1 max-pool as two separable running maxima. paper-her2 over a 1536x2048 thumbnail, one
        thread, CPU s: 24.7 with neither, 5.1 channels-last alone, 2.7 running maxima alone, 2.4 both
        (benchmarks/RESULTS.md, "Slide cost"). A max is exact in any order, so only the convolutions'
        float rounding can differ from ``logits``."""
        if self.inference_channels_last:
            thumbnail = thumbnail.contiguous(memory_format=torch.channels_last)
        features = self.features(thumbnail)
        k = self.pool_size
        padded = F.pad(features, ((k - 1) // 2, k // 2, (k - 1) // 2, k // 2), value=float("-inf"))
        if self.inference_running_max:
            pooled = _running_max(_running_max(padded, k, dim=2), k, dim=3)
        else:
            pooled = F.max_pool2d(padded, k, stride=1)
        return self.to_logit(pooled)[:, 0]

    @property
    def receptive_radius(self) -> int:
        """How far (thumbnail px) a logit looks in any direction: one pixel per 3x3 conv, plus the
        max-pool's longer side (k // 2 after, (k - 1) // 2 before)."""
        return self.conv_layers + self.pool_size // 2

    def tiled_logits(self, thumbnail: torch.Tensor, tile_px: int) -> torch.Tensor:
        """``logits`` computed tile by tile (``tile_px`` square) with a halo of ``receptive_radius``: every
        output pixel sees the same input as in one pass (the image border keeps its zero / -inf padding,
        interior tile edges read real pixels from the halo), so the result equals ``logits`` up to
        float rounding while activations are bounded by the tile, not the slide. For inference; training
        back-propagates through the one-pass ``logits`` on its small thumbnails."""
        if tile_px < 1:
            raise ValueError(f"tile_px must be >= 1, got {tile_px}")
        # uint8 (B, H, W, 3) pixels are converted tile by tile (the same values as converting them all first,
        # without a float copy of the whole thumbnail: 37 MB for a 3.2-GP slide's).
        pixels_uint8 = thumbnail.dtype == torch.uint8
        batch, height, width = (thumbnail.shape[:3] if pixels_uint8 else
                                (thumbnail.shape[0], thumbnail.shape[2], thumbnail.shape[3]))

        def crop(top: int, bottom: int, left: int, right: int) -> torch.Tensor:
            if pixels_uint8:
                return images_to_tensor(thumbnail[:, top:bottom, left:right])
            return thumbnail[:, :, top:bottom, left:right]

        if height <= tile_px and width <= tile_px:
            return self._inference_logits(crop(0, height, 0, width))
        halo = self.receptive_radius
        out = torch.empty((batch, height, width), dtype=torch.float32, device=thumbnail.device)

        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()  # thread-local modes

        def one_tile(row0: int, col0: int) -> None:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                one_tile_here(row0, col0)

        def one_tile_here(row0: int, col0: int) -> None:
            row1, col1 = min(height, row0 + tile_px), min(width, col0 + tile_px)
            top, bottom = max(0, row0 - halo), min(height, row1 + halo)
            left, right = max(0, col0 - halo), min(width, col1 + halo)
            part = self._inference_logits(crop(top, bottom, left, right))
            out[:, row0:row1, col0:col1] = part[:, row0 - top:row1 - top, col0 - left:col1 - left]

        corners = [(row0, col0) for row0 in range(0, height, tile_px) for col0 in range(0, width, tile_px)]
        threads = torch.get_num_threads()
        if threads <= 1 or thumbnail.device.type != "cpu":
            for corner in corners:
                one_tile(*corner)
            return out
        # Tiles side by side, one thread each: small convolutions split across threads spend their time in
        # the threads' barriers, and on a loaded machine 2 intra-op threads took 10x the CPU and 5x the
        # wall time of 1 (3.2-GP slide, cpu-small, measured). Each tile writes its own part of ``out``.
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(threads, thread_name_prefix="sam_tiles") as pool:
                list(pool.map(lambda corner: one_tile(*corner), corners))
        finally:
            torch.set_num_threads(threads)
        return out

    def forward(self, thumbnail: torch.Tensor, tissue_mask: torch.Tensor | None = None,
                tile_px: int | None = None) -> torch.Tensor:
        """``tissue_mask``: (B, H, W) bool or None; a slide whose mask is empty gets all its pixels.
        ``tile_px``: compute the logits tile by tile (``tiled_logits``, bounded memory) instead of in one
        pass; the softmax still runs over the whole map."""
        logits = self.logits(thumbnail) if tile_px is None else self.tiled_logits(thumbnail, tile_px)
        # Without gradients the fresh logits can take the mask in place (one map-sized copy fewer).
        return masked_softmax(logits, tissue_mask, in_place=not torch.is_grad_enabled())


def _running_max(x: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Max over every window of ``k`` along ``dim`` (no padding: length n - k + 1), by doubling spans:
    log2(k) elementwise maxima instead of k (windows of 2, 4, ... then one overlapping step to k)."""
    out_len = x.shape[dim] - k + 1
    span = 1
    while span * 2 <= k:
        length = x.shape[dim] - span
        x = torch.maximum(x.narrow(dim, 0, length), x.narrow(dim, span, length))
        span *= 2
    if span < k:  # windows of ``span`` at i and i + (k - span) together cover [i, i + k)
        rest = k - span
        length = x.shape[dim] - rest
        x = torch.maximum(x.narrow(dim, 0, length), x.narrow(dim, rest, length))
    return x.narrow(dim, 0, out_len)


def masked_softmax(logits: torch.Tensor, tissue_mask: torch.Tensor | None, in_place: bool = False) -> torch.Tensor:
    """(B, H, W) logits -> a softmax over each map's pixels, over tissue only where ``tissue_mask``
    (B, H, W) marks any (a map with an empty mask keeps all its pixels). ``in_place``: the mask is written
    into ``logits`` (which the caller no longer needs) instead of a copy."""
    batch, height, width = logits.shape
    if tissue_mask is not None:
        keep = tissue_mask.to(torch.bool) | ~tissue_mask.reshape(batch, -1).any(dim=1)[:, None, None]
        fill = logits.masked_fill_ if in_place else logits.masked_fill
        logits = fill(~keep, float("-inf"))
    return torch.softmax(logits.reshape(batch, -1), dim=1).reshape(batch, height, width)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class TileFeatureNet(nn.Module):
    """f_f: tiles (n, 3, S, S) in [0, 1] -> features (n, channels).

    ``layers`` conv layers in all: a stride-2 stem, residual blocks of two convs with a 2x max-pool
    between blocks, and (when ``layers`` is even) one last 3x3 conv; then global average pooling.
    No batch norm: batches are a handful of tiles.
    """

    def __init__(self, input_px: int, channels: int, layers: int) -> None:
        super().__init__()
        self.input_px = input_px
        self.out_features = channels
        self.standardise = Standardise()
        self.stem = nn.Conv2d(3, channels, 3, stride=2, padding=1)
        if layers < 3:
            raise ValueError(f"tile.feature_layers must be >= 3 (stem + one residual block), got {layers}")
        self.blocks = nn.ModuleList(ResidualBlock(channels) for _ in range((layers - 1) // 2))
        self.last = nn.Conv2d(channels, channels, 3, padding=1) if (layers - 1) % 2 else None

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        if tiles.shape[-1] != self.input_px or tiles.shape[-2] != self.input_px:
            tiles = F.interpolate(tiles, size=(self.input_px, self.input_px), mode="bilinear",
                                  antialias=True, align_corners=False)
        x = F.relu(self.stem(self.standardise(tiles)))
        for i, block in enumerate(self.blocks):
            if i > 0 and min(x.shape[-2:]) >= 4:
                x = F.max_pool2d(x, 2)
            x = block(x)
        if self.last is not None:
            x = F.relu(self.last(x))
        return x.mean(dim=(2, 3))


class SamHead(nn.Module):
    """Expected tile features (B, C) -> class logits (B, num_classes)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, expected_features: torch.Tensor) -> torch.Tensor:
        return self.fc(expected_features)


# -- hard attention ----------------------------------------------------------------------------------------


class GlimpseSensor(nn.Module):
    """Crops ``scales`` glimpses around ``location`` (B, 2) from ``tiles`` (B, 3, S, S).

    Scale k covers ``glimpse_px * 2**k`` tile pixels, average-pooled by 2**k first so the coarser scale is
    a proper lower magnification (20x from 40x) rather than an aliased subsample. Areas outside the tile
    read as zeros. Returns (B, 3 * scales, glimpse_px, glimpse_px).
    """

    def __init__(self, glimpse_px: int, scales: int) -> None:
        super().__init__()
        self.glimpse_px = glimpse_px
        self.scales = scales

    def sources(self, tiles: torch.Tensor) -> list[torch.Tensor]:
        """The tiles at each scale (average-pooled by 2**k). Computed once per tile, not once per glimpse:
        pooling a whole 2048² tile was 92% of the agent's time when it was redone at each step (measured)."""
        return [F.avg_pool2d(tiles, 2**k) if k > 0 else tiles for k in range(self.scales)]

    def forward(self, tiles: torch.Tensor, location: torch.Tensor,
                sources: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``sources``: ``self.sources(tiles)`` when the caller glimpses the same tiles several times."""
        batch, _, height, width = tiles.shape
        sources = self.sources(tiles) if sources is None else sources
        crops = []
        for k in range(self.scales):
            factor = 2**k
            source = sources[k]
            theta = torch.zeros(batch, 2, 3, dtype=tiles.dtype, device=tiles.device)
            theta[:, 0, 0] = self.glimpse_px * factor / width
            theta[:, 1, 1] = self.glimpse_px * factor / height
            theta[:, :, 2] = location
            grid = F.affine_grid(theta, [batch, 3, self.glimpse_px, self.glimpse_px], align_corners=False)
            crops.append(F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
        return torch.cat(crops, dim=1)


def _small_cnn(in_channels: int, channels: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for out_channels in channels:
        layers += [nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1), nn.ReLU()]
        in_channels = out_channels
    layers.append(nn.AdaptiveAvgPool2d(4))
    layers.append(nn.Flatten())
    return nn.Sequential(*layers)


class GlimpseNetwork(nn.Module):
    """v = relu(Linear(CNN(glimpses))) ⊙ Linear(location): the 'what' gated by the 'where'."""

    def __init__(self, glimpse_px: int, scales: int, out_features: int) -> None:
        super().__init__()
        self.sensor = GlimpseSensor(glimpse_px, scales)
        self.standardise = Standardise()
        self.cnn = _small_cnn(3 * scales, (16, 32, 64))
        self.what = nn.Linear(64 * 16, out_features)
        self.where = nn.Linear(2, out_features)

    def forward(self, tiles: torch.Tensor, location: torch.Tensor,
                sources: list[torch.Tensor] | None = None) -> torch.Tensor:
        glimpses = self.standardise(self.sensor(tiles, location, sources))  # padding outside the tile -> -2
        return F.relu(self.what(self.cnn(glimpses))) * self.where(location)


class ContextNetwork(nn.Module):
    """Downscaled tile with visited areas blacked out -> context features (B, out_features)."""

    def __init__(self, context_px: int, out_features: int) -> None:
        super().__init__()
        self.context_px = context_px
        self.standardise = Standardise()
        self.cnn = _small_cnn(3, (16, 32, 32))
        self.fc = nn.Linear(32 * 16, out_features)

    def downscale(self, tiles: torch.Tensor) -> torch.Tensor:
        return F.interpolate(tiles, size=(self.context_px, self.context_px), mode="bilinear",
                             antialias=True, align_corners=False)

    def forward(self, context_image: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.cnn(self.standardise(context_image))))  # visited areas (0) -> -2


def inhibition_of_return(context_image: torch.Tensor, visited: list[torch.Tensor], box_fraction: float) -> torch.Tensor:
    """Black out, in ``context_image`` (B, 3, c, c), a square of side ``box_fraction`` of the tile around
    each visited location (B, 2) in [-1, 1]^2."""
    if not visited:
        return context_image
    size = context_image.shape[-1]
    centres = (torch.arange(size, dtype=context_image.dtype, device=context_image.device) + 0.5) / size * 2 - 1
    half = box_fraction  # half side in [-1, 1] units = box_fraction * 2 / 2
    seen = torch.zeros(context_image.shape[0], size, size, dtype=torch.bool, device=context_image.device)
    for location in visited:
        in_x = (centres[None, :] - location[:, 0:1]).abs() < half  # (B, c) over columns
        in_y = (centres[None, :] - location[:, 1:2]).abs() < half  # (B, c) over rows
        seen |= in_y[:, :, None] & in_x[:, None, :]
    return context_image * (~seen)[:, None].to(context_image.dtype)


class CoreNetwork(nn.Module):
    """Two stacked LSTM cells: bottom (glimpses -> classifier), top (bottom's state -> location)."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.bottom = nn.LSTMCell(input_size, hidden_size)
        self.top = nn.LSTMCell(hidden_size, hidden_size // 2)


class LocationNetwork(nn.Module):
    """Gaussian policy over the next location: mean limit·tanh(Linear(h_top ⊙ context)), fixed std.

    ``limit`` (1 - glimpse/tile) keeps the finest glimpse inside the tile: without it the means run to
    the corners (tanh saturates, and L_bb pushes glimpses apart), where 3/4 of a glimpse is padding.
    """

    def __init__(self, in_features: int, std: float) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, 2)
        self.std = std

    def forward(
        self, features: torch.Tensor, generator: torch.Generator | None, deterministic: bool, limit: float = 1.0,
        previous: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (mean, location, log_prob). ``location`` is detached: no gradient flows through the
        sample, only through ``log_prob`` (REINFORCE) and ``mean`` (the glimpse-overlap loss). With
        ``previous`` (B, 2) the output is a move from there, taken before the tanh so the mean stays inside
        ±limit: mean = limit·tanh(atanh(previous/limit) + Linear(features))."""
        shift = self.fc(features)
        if previous is not None:
            shift = shift + torch.atanh((previous.detach() / limit).clamp(-0.999, 0.999))
        mean = limit * torch.tanh(shift)
        if deterministic:
            sample = mean.detach()
        else:
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
            sample = (mean + self.std * noise).detach()
        log_prob = torch.distributions.Normal(mean, self.std).log_prob(sample).sum(dim=1)
        return mean, sample.clamp(-limit, limit), log_prob


class ClassifierNetwork(nn.Module):
    def __init__(self, hidden_size: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.fc(hidden), dim=1)


class BaselineNetwork(nn.Module):
    """Predicts the return from the (detached) classifier state; trained by MSE only."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.fc = nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc(hidden.detach())[:, 0]


@dataclass
class AgentOutput:
    """One episode per tile; B tiles, T glimpses, C classes."""

    class_log_probs: torch.Tensor  # (B, T, C)
    log_pi: torch.Tensor  # (B, T) log-probability of each sampled location
    baselines: torch.Tensor  # (B, T)
    locations: torch.Tensor  # (B, T, 2) detached, in [-1, 1]^2 (x, y)
    means: torch.Tensor  # (B, T, 2) policy means, carry gradient


class HardAttentionAgent(nn.Module):
    """Recurrent hard-attention agent over one tile: T glimpses, a class prediction per step."""

    def __init__(self, config: DualAttentionConfig) -> None:
        super().__init__()
        agent = config.agent
        self.n_glimpses = agent.n_glimpses
        self.glimpse_px = agent.glimpse_px
        self.random_first_glimpse = agent.first_glimpse == "random"
        self.relative_moves = agent.relative_moves
        self.tile_px = config.tile.tile_level0_px
        glimpse_features = 2 * agent.glimpse_hidden
        top_size = agent.hidden_size // 2
        self.glimpse = GlimpseNetwork(agent.glimpse_px, agent.glimpse_scales, glimpse_features)
        self.core = CoreNetwork(glimpse_features, agent.hidden_size)
        self.context = ContextNetwork(agent.context_px, top_size)
        self.location = LocationNetwork(top_size, agent.location_std)
        self.classifier = ClassifierNetwork(agent.hidden_size, config.num_classes)
        self.baseline = BaselineNetwork(agent.hidden_size)

    def first_glimpse_limit(self, tile_px: int) -> float:
        """Glimpse centres within ±limit keep the finest glimpse inside a tile of ``tile_px``."""
        return 1.0 - self.glimpse_px / tile_px

    def random_first_locations(self, n_tiles: int, generator: torch.Generator, tile_px: int | None = None
                               ) -> torch.Tensor:
        """(n_tiles, 2) first-glimpse centres uniform over the tile, in [-1, 1]^2 (``tile_px`` defaults to
        the size the agent was configured for)."""
        limit = self.first_glimpse_limit(tile_px or self.tile_px)
        return (2.0 * torch.rand((n_tiles, 2), generator=generator) - 1.0) * limit

    def forward(
        self, tiles: torch.Tensor, generator: torch.Generator | None = None, deterministic: bool = False,
        first_locations: torch.Tensor | None = None,
    ) -> AgentOutput:
        """``tiles``: (B, 3, S, S) float in [0, 1] at level-0 resolution. ``deterministic`` uses the
        policy means as locations (evaluation); otherwise locations are drawn with ``generator``. With a
        random first glimpse its location is ``first_locations`` (B, 2) when given, else drawn with
        ``generator`` (the tile centre when that is None too)."""
        batch, _, tile_px, _ = tiles.shape
        box_fraction = self.glimpse_px / tile_px  # the finest glimpse's side as a fraction of the tile
        limit = self.first_glimpse_limit(tile_px)
        small_tile = self.context.downscale(tiles)
        sources = self.glimpse.sensor.sources(tiles)  # once for all T glimpses
        top_size = self.core.top.hidden_size
        zeros_bottom = tiles.new_zeros(batch, self.core.bottom.hidden_size)
        h_bottom, c_bottom = zeros_bottom, zeros_bottom
        h_top, c_top = None, tiles.new_zeros(batch, top_size)
        visited: list[torch.Tensor] = []
        log_probs, log_pis, baselines, locations, means = [], [], [], [], []
        for step in range(self.n_glimpses):
            context = self.context(inhibition_of_return(small_tile, visited, box_fraction))
            if h_top is None:
                h_top = context  # DRAM: the context starts the top (location) layer
            if step == 0 and self.random_first_glimpse:
                if first_locations is not None:
                    location = first_locations.to(tiles.dtype)
                elif generator is not None:
                    uniform = torch.rand((batch, 2), generator=generator, dtype=tiles.dtype, device=tiles.device)
                    location = (2.0 * uniform - 1.0) * limit
                else:
                    location = tiles.new_zeros(batch, 2)
                mean, log_pi = location, tiles.new_zeros(batch)  # no policy action: nothing to reinforce
            else:
                previous = visited[-1] if visited and self.relative_moves else None
                mean, location, log_pi = self.location(h_top * context, generator, deterministic, limit, previous)
            v = self.glimpse(tiles, location, sources)
            h_bottom, c_bottom = self.core.bottom(v, (h_bottom, c_bottom))
            log_probs.append(self.classifier(h_bottom))
            baselines.append(self.baseline(h_bottom))
            # The top layer reads a detached bottom state: REINFORCE trains only the location pathway.
            h_top, c_top = self.core.top(h_bottom.detach(), (h_top, c_top))
            visited.append(location)
            log_pis.append(log_pi)
            locations.append(location)
            means.append(mean)
        return AgentOutput(
            class_log_probs=torch.stack(log_probs, dim=1),
            log_pi=torch.stack(log_pis, dim=1),
            baselines=torch.stack(baselines, dim=1),
            locations=torch.stack(locations, dim=1),
            means=torch.stack(means, dim=1),
        )


# -- the whole model ---------------------------------------------------------------------------------------


class DualAttentionModel(nn.Module):
    """Holds the four parts; ``pipeline`` composes them (SAM -> sampler -> tiles -> agent -> slide)."""

    def __init__(self, config: DualAttentionConfig) -> None:
        super().__init__()
        config.validate()
        self.task = config.task
        self.num_classes = config.num_classes
        sa, tile = config.soft_attention, config.tile
        self.soft_attention = SoftAttentionNet(sa.conv_layers, sa.base_channels, sa.pool_size)
        self.tile_features = TileFeatureNet(tile.feature_input_px, tile.feature_channels, tile.feature_layers)
        self.sam_head = SamHead(tile.feature_channels, config.num_classes)
        self.agent = HardAttentionAgent(config)

    def sam_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by L_SA (soft attention, tile features, SAM head)."""
        return [*self.soft_attention.parameters(), *self.tile_features.parameters(), *self.sam_head.parameters()]

    def agent_parameters(self) -> list[nn.Parameter]:
        return list(self.agent.parameters())
