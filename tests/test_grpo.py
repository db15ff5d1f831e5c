"""GRPO: advantages by hand, and the loss and its gradient against a direct per-token formula (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from veason_ray.grpo import GRPOLossConfig, group_advantages, grpo_policy_loss, low_var_kl


def test_group_advantages_hand_worked():
    result = group_advantages(
        torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5], [0.1, 0.1, 0.1, 0.1]])
    )
    std = math.sqrt(5 / 3)  # unbiased: ((1.5^2 + 0.5^2) * 2) / 3
    expected = [v / (std + 1e-6) for v in (-1.5, -0.5, 0.5, 1.5)]
    assert result.advantages[0].tolist() == pytest.approx(expected, abs=1e-12)
    # Equal rewards: exactly zero (0.1 is not exact in binary, r - mean alone would leave rounding noise).
    assert result.advantages[1:].eq(0).all()
    assert (result.zero_variance_groups, result.groups) == (2, 3)
    assert result.advantages.dtype == torch.float64


def test_group_of_one_has_zero_advantage():
    result = group_advantages(torch.tensor([[3.0], [1.0]]))
    assert result.advantages.eq(0).all() and result.zero_variance_groups == 2
    with pytest.raises(ValueError):
        group_advantages(torch.tensor([1.0, 2.0]))


def _reference_loss(logp, old, ref, entropy, adv, mask, config: GRPOLossConfig) -> torch.Tensor:
    """The per-token formula, written out token by token on float64 scalars."""
    sequences = []
    token_terms = []
    for b in range(logp.shape[0]):
        terms = []
        for t in range(logp.shape[1]):
            if mask[b, t] == 0:
                continue
            rho = torch.exp(torch.clamp(logp[b, t] - old[b, t], -20, 20))
            a = adv[b]
            rho_clipped = torch.clamp(rho, 1 - config.clip_ratio, 1 + config.clip_ratio)
            pg = torch.maximum(-a * rho, -a * rho_clipped)
            d = torch.clamp(ref[b, t] - logp[b, t], -20, 20)
            kl = torch.clamp(torch.exp(d) - d - 1, -config.kl_clamp, config.kl_clamp)
            terms.append(pg + config.kl_coef * kl - config.entropy_coef * entropy[b, t])
        token_terms.extend(terms)
        if terms:
            sequences.append(sum(terms) / len(terms))
    if config.aggregation == "token_mean":
        return sum(token_terms) / len(token_terms)
    return sum(sequences) / len(sequences)


def _random_batch(seed: int, batch: int = 6, length: int = 9):
    generator = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=generator, dtype=torch.float64) * 3
    logp = (old + torch.randn(batch, length, generator=generator, dtype=torch.float64) * 0.3).requires_grad_()
    ref = old + torch.randn(batch, length, generator=generator, dtype=torch.float64) * 0.5
    entropy = (torch.rand(batch, length, generator=generator, dtype=torch.float64) * 2).requires_grad_()
    adv = torch.randn(batch, generator=generator, dtype=torch.float64)
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    lengths[1] = 0  # a sequence with no response tokens
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(torch.int64)
    return logp, old, ref, entropy, adv, mask


@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_and_gradient_match_the_per_token_formula(aggregation, seed):
    config = GRPOLossConfig(aggregation=aggregation)
    logp, old, ref, entropy, adv, mask = _random_batch(seed)
    loss, metrics = grpo_policy_loss(logp, old, adv, mask, ref_logprobs=ref, entropy=entropy, config=config)
    grads = torch.autograd.grad(loss, (logp, entropy))
    expected = _reference_loss(logp, old, ref, entropy, adv, mask, config)
    expected_grads = torch.autograd.grad(expected, (logp, entropy))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert (grad - expected_grad).abs().max().item() <= 1e-6
    # Padding gets no gradient.
    assert grads[0][mask == 0].eq(0).all() and grads[1][mask == 0].eq(0).all()
    assert metrics["loss"] == pytest.approx(loss.item())


def test_clipping_hand_worked():
    config = GRPOLossConfig(kl_coef=0.0, entropy_coef=0.0)
    old = torch.zeros(1, 4, dtype=torch.float64)
    # Advantage +1, ratios 1.5 (clipped to 1.2), 0.5 (below the range: -0.5 beats -0.8, unclipped), 1.1
    # (inside), then a padding token: loss = -(1.2 + 0.5 + 1.1) / 3, one token in three clipped.
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 1.0]], dtype=torch.float64)).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, metrics = grpo_policy_loss(logp, old, torch.tensor([1.0], dtype=torch.float64), mask, config=config)
    assert loss.item() == pytest.approx(-(1.2 + 0.5 + 1.1) / 3)
    assert metrics["clip_fraction"] == pytest.approx(1 / 3)
    assert metrics["ratio_max"] == pytest.approx(1.5) and metrics["ratio_min"] == pytest.approx(0.5)
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad[0, 0].item() == 0.0  # the clipped token passes no gradient
    # Advantage -1, ratio 0.5: max(0.5, 0.8) = 0.8.
    negative = torch.log(torch.tensor([[0.5]], dtype=torch.float64))
    loss, _ = grpo_policy_loss(negative, old[:, :1], torch.tensor([-1.0]), torch.ones(1, 1), config=config)
    assert loss.item() == pytest.approx(0.8)


def test_low_var_kl_and_its_clamp():
    logp = torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([0.0, 0.5, -3.0, 1e4], dtype=torch.float64)
    kl = low_var_kl(logp, ref)
    assert kl.tolist() == pytest.approx([0.0, math.exp(0.5) - 1.5, math.exp(-3) + 2, 10.0])
    (grad,) = torch.autograd.grad(kl.sum(), logp)
    assert torch.isfinite(grad).all() and grad[3] == 0.0
    # Extreme log-ratios keep the loss and gradient finite in float32.
    extreme = torch.tensor([[300.0, -300.0]], requires_grad=True)
    loss, _ = grpo_policy_loss(
        extreme, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), torch.zeros(1, 2)
    )
    assert torch.isfinite(loss) and torch.isfinite(torch.autograd.grad(loss, extreme)[0]).all()


def test_zero_advantage_groups_leave_only_kl_and_entropy():
    logp, old, ref, entropy, _, mask = _random_batch(5)
    zero = torch.zeros(logp.shape[0], dtype=torch.float64)
    loss, metrics = grpo_policy_loss(logp, old, zero, mask, ref_logprobs=ref, entropy=entropy)
    config = GRPOLossConfig()
    assert metrics["pg_loss"] == 0.0
    assert loss.item() == pytest.approx(
        config.kl_coef * metrics["kl"] - config.entropy_coef * metrics["entropy"]
    )


def test_per_token_advantages_and_empty_batch():
    logp, old, ref, entropy, adv, mask = _random_batch(3)
    per_sequence, _ = grpo_policy_loss(logp, old, adv, mask, ref, entropy)
    per_token, _ = grpo_policy_loss(logp, old, adv[:, None].expand_as(logp), mask, ref, entropy)
    assert per_sequence.item() == pytest.approx(per_token.item(), abs=1e-12)
    empty_mask = torch.zeros_like(mask)
    loss, metrics = grpo_policy_loss(logp, old, adv, empty_mask, ref, entropy)
    assert loss.item() == 0.0 and metrics["ratio_min"] == 1.0
    with pytest.raises(ValueError):
        grpo_policy_loss(logp, old, adv, mask, config=GRPOLossConfig(aggregation="sum"))  # type: ignore[arg-type]


def test_garbage_in_padding_changes_nothing():
    logp, old, ref, entropy, adv, mask = _random_batch(9)
    clean, _ = grpo_policy_loss(logp, old, adv, mask, ref, entropy)
    clean_grad = torch.autograd.grad(clean, logp)[0]
    padded = mask == 0
    dirty = [x.detach().clone() for x in (logp, old, ref, entropy)]
    for x, value in zip(dirty, (float("-inf"), float("nan"), float("inf"), float("nan")), strict=True):
        x[padded] = value
    dirty_logp = dirty[0].requires_grad_()
    loss, _ = grpo_policy_loss(dirty_logp, dirty[1], adv, mask, dirty[2], dirty[3])
    grad = torch.autograd.grad(loss, dirty_logp)[0]
    assert loss.item() == pytest.approx(clean.item(), abs=1e-12)
    assert torch.isfinite(grad).all() and torch.allclose(grad, clean_grad)
