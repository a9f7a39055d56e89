"""Every loss term against a value computed by hand, and the expectation's gradient."""

from __future__ import annotations

import math

import pytest
import torch

from dual_attention import losses
from dual_attention.expectation import expected_features


def test_entropy_term_is_sum_a_log_a() -> None:
    attention = torch.tensor([[0.5, 0.25], [0.25, 0.0]])
    expected = 0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)  # 0·log 0 = 0
    assert losses.entropy_term(attention).item() == pytest.approx(expected, rel=1e-6)


def test_positive_beta_raises_entropy() -> None:
    logits = torch.tensor([2.0, 0.0, -1.0], requires_grad=True)
    attention = torch.softmax(logits, 0).reshape(1, 3)
    _, _, neg_entropy = losses.sam_loss(torch.zeros(1, 2), torch.tensor([0]), [attention], beta=1.0)
    neg_entropy.backward()
    stepped = torch.softmax(logits.detach() - 0.1 * logits.grad, 0)  # a gradient-descent step on β·Σ a log a
    entropy = lambda p: -(p * p.log()).sum().item()  # noqa: E731
    assert entropy(stepped) > entropy(torch.softmax(logits.detach(), 0))


def test_sam_loss_hand_value() -> None:
    attention = torch.tensor([[0.5, 0.25], [0.25, 0.0]])
    total, ce, neg_entropy = losses.sam_loss(torch.tensor([[2.0, 0.0]]), torch.tensor([0]), [attention], beta=0.5)
    assert ce.item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)
    assert total.item() == pytest.approx(math.log(1 + math.exp(-2)) + 0.5 * (-1.0397208), rel=1e-5)
    assert neg_entropy.item() == pytest.approx(-1.0397208, rel=1e-5)


def test_rewards_and_reward_to_go() -> None:
    log_probs = torch.log(torch.tensor([[[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]]]))
    rewards = losses.step_rewards(log_probs, torch.tensor([0]))
    assert rewards.tolist() == [[1.0, 0.0, 1.0]]
    assert losses.reward_to_go(rewards).tolist() == [[2.0, 1.0, 1.0]]


def test_reinforce_hand_value_sum_over_time_mean_over_batch() -> None:
    log_pi = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]], requires_grad=True)
    returns = torch.tensor([[2.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    baselines = torch.tensor([[0.5, 1.5, 1.0], [0.0, 0.0, 0.0]], requires_grad=True)
    loss = losses.reinforce_loss(log_pi, returns, baselines)
    # episode 0: -(-1·1.5 + -2·-0.5 + -0.5·0) = 0.5; episode 1: 0; mean over the batch of 2
    assert loss.item() == pytest.approx(0.25)
    loss.backward()
    assert log_pi.grad.tolist() == [[-0.75, 0.25, 0.0], [0.0, 0.0, 0.0]]  # -advantage / batch
    assert baselines.grad is None, "the advantage is detached: REINFORCE does not train the baseline"


def test_glimpse_overlap_hand_value_and_gradient() -> None:
    means = torch.tensor([[[0.0, 0.0], [0.25, 0.0], [1.0, 1.0]]], requires_grad=True)
    loss = losses.glimpse_overlap_loss(means, box_half_side=0.25)
    # boxes of side 0.5: pair (0, 1) overlaps 0.25 x 0.5 = 0.125, IoU 0.125 / (0.5 - 0.125) = 1/3; others 0
    assert loss.item() == pytest.approx((1 / 3) / 3, rel=1e-6)
    loss.backward()
    assert means.grad[0, 0, 0] > 0 > means.grad[0, 1, 0], "pushes the overlapping pair apart"
    assert torch.all(means.grad[0, 2] == 0)
    assert losses.glimpse_overlap_loss(torch.zeros(2, 1, 2), 0.25).item() == 0.0


def test_score_loss_uses_expected_score() -> None:
    log_probs = torch.log(torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4]]))
    # expected scores 0.6 and 2.0; labels 0 and 3: |0.6 - 0| and |2.0 - 3|
    assert losses.score_loss(log_probs, torch.tensor([0, 3])).item() == pytest.approx((0.6 + 1.0) / 2, rel=1e-6)


def test_agent_losses_hand_value() -> None:
    class_log_probs = torch.log(torch.tensor([[[0.8, 0.2], [0.3, 0.7]]]))
    log_pi = torch.tensor([[-1.0, -3.0]])
    baselines = torch.tensor([[0.5, 0.5]])
    means = torch.zeros(1, 2, 2)  # identical boxes: IoU 1
    result = losses.agent_losses(class_log_probs, log_pi, baselines, means, torch.tensor([0]),
                                 box_half_side=0.1, delta=0.5)
    # rewards [1, 0] -> returns [1, 0]; advantages [0.5, -0.5]; reinforce -(-1·0.5 + -3·-0.5) = -1
    assert result.reinforce.item() == pytest.approx(-1.0)
    nll = (-math.log(0.8) - math.log(0.3)) / 2
    assert result.nll.item() == pytest.approx(nll, rel=1e-6)
    assert result.baseline_mse.item() == pytest.approx(0.25)
    assert result.l_theta.item() == pytest.approx(-1.0 + nll + 0.25, rel=1e-6)
    assert result.l_bb.item() == pytest.approx(1.0)
    assert result.l_s.item() == pytest.approx(0.7, rel=1e-6)
    assert result.l_ha.item() == pytest.approx(-1.0 + nll + 0.25 + 0.5 * (1.0 + 0.7), rel=1e-6)
    assert result.accuracy_last_step == 0.0 and result.mean_reward == 0.5


def test_joint_loss_hand_value() -> None:
    assert losses.joint_loss(torch.tensor(2.0), torch.tensor(3.0), alpha=0.5, epoch=2).item() == pytest.approx(2.75)
    assert losses.joint_loss(torch.tensor(2.0), torch.tensor(3.0), alpha=0.5, epoch=0).item() == pytest.approx(5.0)


def test_expectation_value_and_gradient_by_hand() -> None:
    attention = torch.tensor([0.2, 0.05], requires_grad=True)
    features = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    value = expected_features(attention, features)
    assert value.tolist() == pytest.approx([2.0, 3.0])
    (value * torch.tensor([1.0, -1.0])).sum().backward()
    # d/da_i = (f_i · w) / (n a_i); d/df_i = w / n
    assert attention.grad.tolist() == pytest.approx([(1 - 2) / (2 * 0.2), (3 - 4) / (2 * 0.05)])
    assert features.grad.tolist() == [[0.5, -0.5], [0.5, -0.5]]


def test_expectation_gradient_is_unbiased_when_sampling_from_the_attention() -> None:
    """Drawing locations i.i.d. from a, the estimator's gradient w.r.t. the attention logits matches the
    gradient of the exact expectation Σ a_i f_i."""
    logits = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0], requires_grad=True)
    features = torch.tensor([[1.0], [-2.0], [0.5], [3.0], [-1.0]])
    exact = (torch.softmax(logits, 0)[:, None] * features).sum()
    (exact_grad,) = torch.autograd.grad(exact, logits)
    attention = torch.softmax(logits, 0)
    draws = torch.multinomial(attention.detach(), 200_000, replacement=True,
                              generator=torch.Generator().manual_seed(0))
    estimate = expected_features(attention[draws], features[draws]).sum()
    (estimate_grad,) = torch.autograd.grad(estimate, logits)
    assert torch.allclose(estimate_grad, exact_grad, atol=0.02), (estimate_grad, exact_grad)
    assert estimate.item() == pytest.approx(exact.item(), abs=0.02)


def test_expectation_refuses_bad_shapes() -> None:
    with pytest.raises(ValueError, match="expected attention"):
        expected_features(torch.ones(3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="no sampled tiles"):
        expected_features(torch.ones(0), torch.ones(0, 4))
