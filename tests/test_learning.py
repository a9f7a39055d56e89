"""Proof that the two attention stages learn, at CI size (longer runs with figures:
benchmarks/bench_learning.py).

1. The agent alone, on tiles whose label shows only in the top-left corner: accuracy rises from chance
   and its glimpses move into that corner.
2. The glimpses follow the evidence: with the label patch in a different corner per tile, a trained
   policy's trails differ between tiles (a collapsed policy takes one path for every tile and fails).
3. SAM and agent trained jointly (the training job's step), on toy slides whose label shows only inside
   a tumour: the agent learns to read it and the attention mass moves onto the tumour.
"""

from __future__ import annotations

import numpy as np

from dual_attention.metrics import glimpse_spread
from dual_attention.synthetic.toy_tasks import (
    LABEL_REGION_PX,
    glimpses_in_label_region,
    glimpses_on_corner,
    train_agent_on_moving_region_task,
    train_agent_on_region_task,
    train_sam_on_toy_slides,
)


def location_histogram(locations_xy: np.ndarray, bins: int = 4) -> np.ndarray:
    """Share of glimpses per cell of a bins x bins grid over the tile (rows: y, top first)."""
    flat = locations_xy.reshape(-1, 2)
    histogram, _, _ = np.histogram2d(flat[:, 1], flat[:, 0], bins=bins, range=[[-1, 1], [-1, 1]])
    return histogram / len(flat)


def test_agent_learns_to_look_where_the_label_is() -> None:
    before, after, history = train_agent_on_region_task(steps=80, seed=0)
    glimpse_px = 8
    seen_before = glimpses_in_label_region(before.locations_xy, glimpse_px).any(axis=1).mean()
    seen_after = glimpses_in_label_region(after.locations_xy, glimpse_px).any(axis=1).mean()
    print(f"\nlabel region: top-left {LABEL_REGION_PX}px of 64px")
    print(f"before: accuracy {before.accuracy:.2f}, tiles with a glimpse on the label {seen_before:.2f}, "
          f"glimpse share on a 4x4 grid (top row first)\n{location_histogram(before.locations_xy).round(2)}")
    print(f"after:  accuracy {after.accuracy:.2f}, tiles with a glimpse on the label {seen_after:.2f}, "
          f"glimpse share on a 4x4 grid\n{location_histogram(after.locations_xy).round(2)}")
    assert before.accuracy < 0.7 and seen_before < 0.2, "the task must not be solvable from the start"
    assert after.accuracy >= 0.9
    assert seen_after >= 0.9
    # the top-left cell (16 px) lies inside the 24 px label region
    assert location_histogram(after.locations_xy)[0, 0] > location_histogram(before.locations_xy)[0, 0] + 0.2
    assert np.mean([h["accuracy"] for h in history[-10:]]) > np.mean([h["accuracy"] for h in history[:10]])


def test_glimpse_trails_follow_the_evidence_instead_of_collapsing_to_one_path() -> None:
    before, after, corners = train_agent_on_moving_region_task(steps=250, seed=0)
    spread_before, spread_after = glimpse_spread(before.locations_xy), glimpse_spread(after.locations_xy)
    coarse_px = 16  # the coarser glimpse scale (8 px at 2x) is what reads a patch from nearby
    on_before = glimpses_on_corner(before.locations_xy, corners, coarse_px).any(axis=1).mean()
    on_after = glimpses_on_corner(after.locations_xy, corners, coarse_px).any(axis=1).mean()
    print(f"\nspread of glimpses 2..T across tiles: {spread_before:.3f} -> {spread_after:.3f}; accuracy "
          f"{before.accuracy:.2f} -> {after.accuracy:.2f}; tiles with a glimpse on their patch "
          f"{on_before:.2f} -> {on_after:.2f}")
    assert spread_before < 0.05, "a fresh policy takes (nearly) one path for every tile"
    assert after.accuracy >= 0.9
    assert spread_after >= 0.1, "the trained policy's trails differ between tiles"
    # Not asserted: that the glimpses land on the patch. The policy reads the context (the whole tile at
    # low power), and where it moves can itself carry the label to the classifier (measured: accuracy 1.0
    # with glimpses on the patch in under a quarter of the tiles).


def test_soft_attention_learns_to_attend_to_the_tumour() -> None:
    """Joint training, as the training job runs it: the agent learns to read the tumour's stain, and the
    SAM, taught by the agent's reward through the tiles it draws, moves its mass onto the tumour. Fails
    when the attention does not move."""
    before, after, history, _, _ = train_sam_on_toy_slides(steps=80, seed=0, beta=0.01)
    print(f"\nbefore: {before}\nafter:  {after}\n(tumour is about 10% of tissue); agent tile accuracy, "
          f"last 10 steps: {np.mean([h['tile_accuracy'] for h in history[-10:]]):.2f}")
    assert before.mass_share < 0.2, "a fresh SAM is near-uniform: mass on tumour is about its area share"
    assert before.pixel_auroc < 0.7, "a fresh SAM does not rank tumour first"
    assert after.mass_share > 0.5, "more attention inside the tumour than outside it"
    assert after.pixel_auroc > 0.9 and after.sampler_hit_rate > before.sampler_hit_rate + 0.3
    assert np.mean([h["tile_accuracy"] for h in history[-10:]]) > np.mean([h["tile_accuracy"] for h in history[:10]])
    ratios = [h["attention_tumour_ratio"] for h in history]
    assert np.mean(ratios[-10:]) > 2.0 * np.mean(ratios[:10]), "the logged attention-on-tumour figure shows it"
