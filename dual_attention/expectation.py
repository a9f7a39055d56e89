"""The attention-sampling expectation: E_{i~a}[f_i] from a few sampled tiles, with a gradient that reaches
the attention a (Katharopoulos & Fleuret 2019, idiap/attention-sampling ``ats/core/expectation.py``).

Estimator: the **with-replacement** form. For n sampled locations with attention a_i and features f_i,

    value    E ≈ (1/n) Σ_i f_i
    gradient ∂E/∂f_i = 1/n,   ∂E/∂a_i = f_i / (n · a_i)

written here without a custom autograd function as ``mean_i (a_i / stopgrad(a_i)) · f_i``: the ratio is 1
in the forward pass and carries d a_i / a_i backwards, the score-function (REINFORCE) form of d E / d a.

Why not ATS's without-replacement estimator: it is unbiased only if the samples are sequential draws from
a itself, and its correction uses the probability mass left before each draw (1 - Σ_{j<i} a_j). Our
sampler is not such a draw: it ranks min-max-normalised attention plus uniform noise inside an Otsu or
k-means mask, and keeps a greedy, distance-filtered top-N. The with-replacement form needs only each
sampled location's own attention, does not depend on an order the sampler does not have, and its
gradient pushes up the attention of tiles whose features lower the loss and (through the softmax) down
elsewhere. Neither form is unbiased for this sampler; the paper does not say which it used.
"""

from __future__ import annotations

import torch


def expected_features(attention_at_samples: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``attention_at_samples`` (n,) > 0 and ``features`` (n, C) -> the expectation (C,)."""
    if attention_at_samples.ndim != 1 or features.ndim != 2 or features.shape[0] != attention_at_samples.shape[0]:
        raise ValueError(
            f"expected attention (n,) and features (n, C), got {tuple(attention_at_samples.shape)} "
            f"and {tuple(features.shape)}"
        )
    if features.shape[0] == 0:
        raise ValueError("no sampled tiles: the expectation needs at least one")
    ratio = attention_at_samples / attention_at_samples.detach()
    return (ratio[:, None] * features).mean(dim=0)
