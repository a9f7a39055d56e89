"""The dual attention model's losses.

- L_SA = signal + β·Σ a log a  (β > 0 raises entropy, as ATS's ``multinomial_entropy`` regulariser).
  The signal is REINFORCE through the tiles drawn from the attention, −Σ_tiles (r − b)·log a(tile) with
  r the agent's probability of the label on the tile and b the slide's mean r
  (``attention_reinforce_loss``), or the paper's CE(SAM head over the expected tile features, label)
  (``sam_loss``).
- L_θ = REINFORCE with baseline + classification NLL + baseline MSE. Rewards r_t = 1 when step t's
  prediction is right; location l_t decides glimpse t and so every prediction from t on, so its return is
  the reward-to-go G_t = Σ_{t'≥t} r_{t'}; the baseline regresses G_t and the advantage G_t − b_t is
  detached. REINFORCE is summed over time and averaged over the batch; NLL and MSE are averaged over
  batch and time.
- L_bb: mean pairwise overlap (IoU) of the finest-scale glimpse boxes centred on the policy means, over
  the T-choose-2 pairs (means, not samples, so it has a gradient).
- L_s = |E[score] − GT| with E[score] = Σ_k k·p_k of the final step's class probabilities.
- L_HA = L_θ + δ·(L_bb + L_s);  L_J = L_HA + α^epoch · L_SA.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import torch
import torch.nn.functional as F


def entropy_term(attention: torch.Tensor) -> torch.Tensor:
    """Σ a log a over the last two axes (negative entropy), averaged over any leading axes."""
    flat = attention.reshape(-1, attention.shape[-2] * attention.shape[-1]) if attention.ndim >= 2 else attention[None]
    return (flat * torch.log(flat.clamp_min(1e-12))).sum(dim=1).mean()


def sam_loss(logits: torch.Tensor, labels: torch.Tensor, attention_maps: list[torch.Tensor], beta: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L_SA for a batch of slides: (total, cross-entropy, entropy term Σ a log a averaged over slides)."""
    ce = F.cross_entropy(logits, labels)
    neg_entropy = torch.stack([entropy_term(a) for a in attention_maps]).mean()
    return ce + beta * neg_entropy, ce, neg_entropy


def attention_reinforce_loss(attention_at_tiles: list[torch.Tensor], rewards: list[torch.Tensor] | tuple[torch.Tensor, ...]
                             ) -> torch.Tensor:
    """−Σ_i (r_i − mean r)·log a_i over each slide's drawn tiles, averaged over slides. ``attention_at_tiles``:
    per slide the attention (with gradient) at its tiles; ``rewards``: per slide the tiles' rewards. The
    per-slide mean is the baseline: what is rewarded is a tile being better evidence than the slide's
    other tiles, so a slide whose tiles are all alike teaches nothing (and adds no variance)."""
    terms = []
    for attention, reward in zip(attention_at_tiles, rewards, strict=True):
        advantage = (reward - reward.mean()).detach()
        terms.append(-(advantage * torch.log(attention.clamp_min(1e-30))).sum())
    return torch.stack(terms).mean()


@dataclass
class AgentLosses:
    l_theta: torch.Tensor
    reinforce: torch.Tensor
    nll: torch.Tensor
    baseline_mse: torch.Tensor
    l_bb: torch.Tensor
    l_s: torch.Tensor
    l_ha: torch.Tensor
    accuracy_last_step: float
    mean_reward: float


def step_rewards(class_log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T, C), (B,) -> (B, T) float: 1 where step t's prediction is right."""
    return (class_log_probs.argmax(dim=2) == labels[:, None]).float()


def reward_to_go(rewards: torch.Tensor) -> torch.Tensor:
    """G_t = Σ_{t'≥t} r_{t'} along the time axis of (B, T)."""
    return rewards.flip(1).cumsum(1).flip(1)


def reinforce_loss(log_pi: torch.Tensor, returns: torch.Tensor, baselines: torch.Tensor) -> torch.Tensor:
    """-Σ_t log π(l_t)·(G_t − b_t), summed over time, mean over batch; the advantage is detached."""
    advantage = (returns - baselines).detach()
    return -(log_pi * advantage).sum(dim=1).mean()


def glimpse_overlap_loss(means: torch.Tensor, box_half_side: float) -> torch.Tensor:
    """Mean IoU over all T-choose-2 pairs of square boxes of half side ``box_half_side`` (in [-1, 1]
    units) centred on ``means`` (B, T, 2); 0 for T < 2."""
    steps = means.shape[1]
    if steps < 2:
        return means.new_zeros(())
    side = 2.0 * box_half_side
    area = side * side
    overlaps = []
    for i, j in combinations(range(steps), 2):
        gap = (means[:, i] - means[:, j]).abs()
        inter_sides = (side - gap).clamp_min(0.0)
        inter = inter_sides[:, 0] * inter_sides[:, 1]
        overlaps.append(inter / (2 * area - inter))
    return torch.stack(overlaps, dim=1).mean()


def score_loss(class_log_probs_last: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """|Σ_k k·p_k − label|, mean over batch; (B, C) log-probabilities of the final step."""
    probs = class_log_probs_last.exp()
    ks = torch.arange(probs.shape[1], dtype=probs.dtype, device=probs.device)
    return ((probs * ks).sum(dim=1) - labels.to(probs.dtype)).abs().mean()


def agent_losses(class_log_probs: torch.Tensor, log_pi: torch.Tensor, baselines: torch.Tensor,
                 means: torch.Tensor, labels: torch.Tensor, box_half_side: float, delta: float) -> AgentLosses:
    """All of L_HA from one batch of episodes (shapes as in ``models.AgentOutput``)."""
    rewards = step_rewards(class_log_probs, labels)
    returns = reward_to_go(rewards)
    reinforce = reinforce_loss(log_pi, returns, baselines)
    steps = class_log_probs.shape[1]
    nll = F.nll_loss(class_log_probs.reshape(-1, class_log_probs.shape[2]), labels.repeat_interleave(steps))
    baseline_mse = F.mse_loss(baselines, returns)
    l_theta = reinforce + nll + baseline_mse
    l_bb = glimpse_overlap_loss(means, box_half_side)
    l_s = score_loss(class_log_probs[:, -1], labels)
    return AgentLosses(
        l_theta=l_theta, reinforce=reinforce, nll=nll, baseline_mse=baseline_mse, l_bb=l_bb, l_s=l_s,
        l_ha=l_theta + delta * (l_bb + l_s),
        accuracy_last_step=float(rewards[:, -1].mean()), mean_reward=float(rewards.mean()),
    )


def joint_loss(l_ha: torch.Tensor, l_sa: torch.Tensor, alpha: float, epoch: int) -> torch.Tensor:
    """L_J = L_HA + α^epoch · L_SA."""
    return l_ha + alpha**epoch * l_sa
