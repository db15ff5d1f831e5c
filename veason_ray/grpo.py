"""GRPO math of docs/method.md section 5: group-normalised advantages and the clipped policy loss with the k3
("low_var_kl") KL penalty and an entropy bonus, on padded (B, L) token batches with a response mask.

Per token, with rho = exp(logp - logp_old) and d = logp_ref - logp:
    loss = max(-A * rho, -A * clip(rho, 1 - clip_ratio, 1 + clip_ratio))
           - entropy_coef * H + kl_coef * clamp(exp(d) - d - 1, -kl_clamp, kl_clamp)
aggregated as the mean over sequences of each sequence's token mean (the paper), or as the mean over all
response tokens of the batch ("token_mean").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from veason_ray.config import Aggregation, GRPOLossConfig

__all__ = [
    "Aggregation",
    "GRPOLossConfig",
    "GroupAdvantages",
    "group_advantages",
    "grpo_policy_loss",
    "low_var_kl",
]
# exp(+-20) is finite in float32, and every |d| > 20 (or |log rho| > 20) already lies where the clamps decide
# the value (k3 > 10) or far outside the clip range, so these bounds only keep exp() and its gradient finite.
_LOG_BOUND = 20.0


@dataclass(frozen=True)
class GroupAdvantages:
    """advantages: (G, n) one per response; zero_variance_groups: groups whose rewards were all equal (or of a
    single response), given advantage 0; groups: G."""

    advantages: torch.Tensor
    zero_variance_groups: int
    groups: int


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> GroupAdvantages:
    """A_i = (r_i - mean) / (std + eps) within each group, std unbiased (n - 1), computed in float64.

    rewards: (G, n), one row per prompt group. A group whose rewards are all equal gets exactly 0 (not the
    rounding noise of r - mean), as does a group of one response (its std is undefined)."""
    values = torch.as_tensor(rewards, dtype=torch.float64)
    if values.dim() != 2:
        raise ValueError(f"rewards must be (groups, group_size), got shape {tuple(values.shape)}")
    groups, size = values.shape
    if size < 2:
        return GroupAdvantages(torch.zeros_like(values), groups, groups)
    constant = values.amax(dim=1) == values.amin(dim=1)
    mean = values.mean(dim=1, keepdim=True)
    std = values.std(dim=1, unbiased=True, keepdim=True)
    advantages = (values - mean) / (std + eps)
    advantages = torch.where(constant[:, None], torch.zeros_like(advantages), advantages)
    return GroupAdvantages(advantages, int(constant.sum()), groups)


def low_var_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, clamp: float = 10.0) -> torch.Tensor:
    """k3 estimator of KL(policy || ref) per token: exp(d) - d - 1 with d = ref - logp, clamped to +-clamp."""
    d = (ref_logprobs - logprobs).clamp(-_LOG_BOUND, _LOG_BOUND)
    return (torch.exp(d) - d - 1).clamp(-clamp, clamp)


def _zero_padding(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Padded positions set to 0 (whatever they held), so they stay finite forward and get zero gradient."""
    return torch.where(valid, values, values.new_zeros(()))


def _aggregate(
    values: torch.Tensor, mask: torch.Tensor, aggregation: Aggregation, normalizer: float | None = None
) -> torch.Tensor:
    """Masked mean of (B, L) values: per sequence then over sequences with >= 1 token, or over all tokens.
    With `normalizer`, the sum is divided by it instead of by this batch's own count of sequences (tokens)."""
    if aggregation == "token_mean":
        count = mask.sum().clamp(min=1) if normalizer is None else normalizer
        return (values * mask).sum() / count
    if aggregation == "seq_mean_token_mean":
        tokens = mask.sum(dim=-1)
        per_sequence = (values * mask).sum(dim=-1) / tokens.clamp(min=1)
        count = (tokens > 0).sum().clamp(min=1) if normalizer is None else normalizer
        return per_sequence.sum() / count
    raise ValueError(f"unknown aggregation {aggregation!r}")


def grpo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    config: GRPOLossConfig | None = None,
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss of a padded batch and its metrics.

    logprobs: (B, L) per-token log-probabilities under the policy being trained (carry the gradient);
    old_logprobs: (B, L) under the policy that sampled; ref_logprobs: (B, L) under the frozen reference (None:
    no KL term); entropy: (B, L) per-token entropy of the policy (None: no bonus); advantages: (B,) per sequence
    or (B, L) per token; response_mask: (B, L), 1 on response tokens, 0 on padding. Padded positions may
    hold anything (-inf, NaN): they are replaced before any arithmetic and receive zero gradient.
    normalizer: when this batch is one micro-batch of a larger one, the larger batch's count of sequences
    with >= 1 response token ("seq_mean_token_mean") or of response tokens ("token_mean"); the loss, pg_loss,
    kl and entropy of all micro-batches then sum to the larger batch's values. None: this batch alone.
    Returns the scalar loss and float metrics (masked token means unless named otherwise): loss, pg_loss, kl,
    entropy, clip_fraction, ppo_kl, ratio_mean, ratio_min, ratio_max.
    """
    config = config or GRPOLossConfig()
    valid = response_mask.bool()
    mask = valid.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype)
    if adv.dim() == 1:
        adv = adv[:, None]
    logprobs, old_logprobs, adv = (
        _zero_padding(x, valid) for x in (logprobs, old_logprobs, adv.expand_as(valid))
    )
    log_ratio = (logprobs - old_logprobs).clamp(-_LOG_BOUND, _LOG_BOUND)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - config.clip_ratio, 1.0 + config.clip_ratio)
    token_loss = torch.maximum(unclipped, clipped)
    pg_loss = _aggregate(token_loss, mask, config.aggregation, normalizer)
    loss = pg_loss
    kl = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    if ref_logprobs is not None:
        token_kl = low_var_kl(logprobs, _zero_padding(ref_logprobs, valid), config.kl_clamp)
        kl = _aggregate(token_kl, mask, config.aggregation, normalizer)
        loss = loss + config.kl_coef * kl
    mean_entropy = torch.zeros_like(kl)
    if entropy is not None:
        mean_entropy = _aggregate(_zero_padding(entropy, valid), mask, config.aggregation, normalizer)
        loss = loss - config.entropy_coef * mean_entropy
    metrics = _loss_metrics(
        loss, pg_loss, kl, mean_entropy, unclipped, clipped, log_ratio, ratio, response_mask
    )
    return loss, metrics


def _loss_metrics(
    loss: torch.Tensor,
    pg_loss: torch.Tensor,
    kl: torch.Tensor,
    entropy: torch.Tensor,
    unclipped: torch.Tensor,
    clipped: torch.Tensor,
    log_ratio: torch.Tensor,
    ratio: torch.Tensor,
    response_mask: torch.Tensor,
) -> dict[str, float]:
    """Detached metrics, read back from the device in one transfer."""
    with torch.no_grad():
        valid = response_mask.bool()
        tokens = valid.sum().clamp(min=1)
        if valid.any():
            ratio_min, ratio_max = ratio[valid].min(), ratio[valid].max()
        else:
            ratio_min = ratio_max = torch.ones((), dtype=ratio.dtype, device=ratio.device)
        parts = [
            loss,
            pg_loss,
            kl,
            entropy,
            ((clipped > unclipped) & valid).sum() / tokens,
            (-log_ratio * valid).sum() / tokens,
            (ratio * valid).sum() / tokens,
            ratio_min,
            ratio_max,
        ]
        values = torch.stack([part.detach().to(torch.float64) for part in parts])
    names = (
        "loss",
        "pg_loss",
        "kl",
        "entropy",
        "clip_fraction",
        "ppo_kl",
        "ratio_mean",
        "ratio_min",
        "ratio_max",
    )
    return dict(zip(names, values.tolist(), strict=True))
