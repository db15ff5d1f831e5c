"""One GRPO update on one rank of the learner: reference log-probs, the clipped loss of `veason_ray/grpo.py`
per micro-batch, backward, and one optimizer step for the whole rollout batch.

Data parallel: each rank holds a share of the batch's sequences. The loss of every micro-batch is the batch's
loss restricted to it (`grpo_policy_loss(normalizer=<count over all ranks>)`), times the world size because
DeepSpeed averages gradients over ranks; so after all micro-batches of all ranks the gradient is exactly the
gradient of the batch's loss, whatever the split. Ranks run the same number of micro-batches (ZeRO's
collectives run in step); a rank with fewer sequences runs masked copies that contribute nothing.

Old log-probs: with one optimizer step per rollout batch (the paper), the policy before the step is the
policy that sampled (up to the engine's numerics), so `old_logprobs="recompute"` takes the training forward's
own log-probs (no extra pass; ratio = 1, the clip inactive) and reports how far the engine's log-probs were
from them (`logprob_diff_engine`). `"engine"` uses the rollout engine's log-probs, as generation that runs ahead
of training needs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from veason_ray.config import LearnerConfig
from veason_ray.grpo import grpo_policy_loss
from veason_ray.training.policy_forward import response_logprobs
from veason_ray.training.sequences import (
    MicroBatch,
    PolicySequence,
    collate,
    loss_mask,
    pack_by_tokens,
    split_micro_batches,
)

_SUMMED = ("loss", "pg_loss", "kl", "entropy")  # normalised by the global count: their sum is the batch value
_TOKEN_MEANS = ("clip_fraction", "ppo_kl", "ratio_mean")


def plan_micro_batches(sequences: Sequence[PolicySequence], cfg: LearnerConfig) -> list[list[PolicySequence]]:
    """This rank's micro-batches: packed by `learner.micro_batch_tokens` when set, else `micro_batch_size`
    sequences each."""
    if cfg.micro_batch_tokens > 0:
        return pack_by_tokens(sequences, cfg.micro_batch_tokens)
    return split_micro_batches(sequences, cfg.micro_batch_size)


def loss_normalizer(
    sequences: Sequence[PolicySequence], aggregation: str, forbidden_ids: Sequence[int]
) -> float:
    """This rank's count for `grpo_policy_loss(normalizer=...)`: sequences with >= 1 loss token, or loss
    tokens (the caller sums it over ranks)."""
    if not sequences:
        return 0.0
    masks = [loss_mask(s.response_ids, forbidden_ids) for s in sequences]
    if aggregation == "token_mean":
        return float(sum(m.sum() for m in masks))
    return float(sum(1 for m in masks if m.sum() > 0))


def _padded_micro_batches(
    sequences: Sequence[PolicySequence], cfg: LearnerConfig, count: int
) -> list[list[PolicySequence]]:
    """The micro-batches of `sequences`, padded to `count` with masked copies (no loss tokens)."""
    chunks = plan_micro_batches(sequences, cfg)
    first = sequences[0]
    empty = replace(
        first,
        response_ids=first.response_ids[:0],
        advantage=0.0,
        old_logprobs=None if first.old_logprobs is None else first.old_logprobs[:0],
        ref_logprobs=None,
    )
    while len(chunks) < count:
        chunks.append([empty])
    return chunks


class GRPOUpdater:
    """The per-rank update of a DeepSpeed `engine`; `reference` is a frozen model, the string "adapters-off"
    (LoRA: the policy with its adapters disabled) or None (no KL term)."""

    def __init__(
        self,
        engine: Any,
        reference: Any,
        cfg: LearnerConfig,
        pad_id: int,
        forbidden_ids: Sequence[int],
        world_size: int,
    ) -> None:
        self.engine = engine
        self.reference = reference
        self.cfg = cfg
        self.pad_id = pad_id
        self.forbidden_ids = list(forbidden_ids)
        self.world_size = world_size
        self.device = next(engine.module.parameters()).device

    def _synchronize(self) -> None:
        """Waits for queued GPU work, so that stage timings measure work, not kernel launches."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _batch(self, sequences: Sequence[PolicySequence]) -> MicroBatch:
        cfg = self.cfg
        packed = cfg.micro_batch_tokens > 0
        batch = collate(sequences, self.pad_id, self.forbidden_ids, packed, cfg.attention_bucket_tokens)
        return batch.to(self.device)

    @torch.no_grad()
    def _reference_logprobs(self, batch: MicroBatch) -> torch.Tensor:
        if self.reference == "adapters-off":
            with self.engine.module.policy.disable_adapter():
                return response_logprobs(self.engine, batch)[0]
        return response_logprobs(self.reference, batch, chunk_tokens=self.cfg.logprob_chunk_tokens)[0]

    @torch.no_grad()
    def logprobs(
        self, sequences: Sequence[PolicySequence], count: int, which: str = "policy"
    ) -> list[torch.Tensor]:
        """(R,) log-probs of each sequence's response under the current policy or the reference, in
        `count` micro-batches (equal on every rank)."""
        self.engine.module.eval()
        out: list[torch.Tensor] = []
        for chunk in _padded_micro_batches(sequences, self.cfg, count):
            batch = self._batch(chunk)
            values = (
                self._reference_logprobs(batch)
                if which == "reference"
                else response_logprobs(self.engine, batch)[0]
            )
            out += [values[i, :n].float().cpu() for i, n in enumerate(batch.response_lengths)]
        return out[: len(sequences)]

    def update(self, sequences: Sequence[PolicySequence], count: int, normalizer: float) -> dict[str, float]:
        """One optimizer step over `sequences` (this rank's share) in `count` micro-batches; `normalizer` is
        `loss_normalizer` summed over all ranks. Returns this rank's metric sums (see `combine_metrics`)."""
        cfg = self.cfg
        start = time.perf_counter()
        self.engine.module.train()
        use_kl = self.reference is not None and cfg.loss.kl_coef > 0
        sums = dict.fromkeys(_SUMMED + _TOKEN_MEANS, 0.0)
        sums.update(
            logprob_diff_engine=0.0,
            engine_tokens=0.0,
            tokens=0.0,
            loss_tokens=0.0,
            sequences=float(len(sequences)),
            ratio_min=float("inf"),
            ratio_max=0.0,
            reference_seconds=0.0,
        )
        chunks = _padded_micro_batches(sequences, cfg, count)
        for index, chunk in enumerate(chunks):
            # Gradients accumulate until the last micro-batch; there they are reduced and the step taken.
            self.engine.set_gradient_accumulation_boundary(index == len(chunks) - 1)
            batch = self._batch(chunk)
            started = time.perf_counter()
            ref = self._reference_logprobs(batch) if use_kl else None
            self._synchronize()
            sums["reference_seconds"] += time.perf_counter() - started
            logprobs, entropy = response_logprobs(self.engine, batch, with_entropy=cfg.loss.entropy_coef > 0)
            engine_logprobs = batch.old_logprobs
            old = (
                logprobs.detach()
                if cfg.old_logprobs == "recompute" or engine_logprobs is None
                else engine_logprobs
            )
            loss, metrics = grpo_policy_loss(
                logprobs, old, batch.advantages, batch.response_mask, ref, entropy, cfg.loss, normalizer
            )
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            tokens = float(batch.response_mask.sum())
            if engine_logprobs is not None:
                diff = (logprobs.detach() - engine_logprobs).abs() * batch.response_mask
                sums["logprob_diff_engine"] += float(diff.sum())
                sums["engine_tokens"] += tokens
            for key in _SUMMED:
                sums[key] += metrics[key]
            for key in _TOKEN_MEANS:
                sums[key] += metrics.get(key, 0.0) * tokens
            if tokens:
                sums["ratio_min"] = min(sums["ratio_min"], metrics["ratio_min"])
                sums["ratio_max"] = max(sums["ratio_max"], metrics["ratio_max"])
            sums["loss_tokens"] += tokens
            sums["tokens"] += batch.tokens if tokens else 0.0
        self._synchronize()
        started = time.perf_counter()
        self.engine.step()
        self._synchronize()
        sums["optimizer_seconds"] = time.perf_counter() - started
        grad_norm = self.engine.get_global_grad_norm()
        sums["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        sums["lr"] = float(self.engine.get_lr()[0])
        sums["seconds"] = time.perf_counter() - start
        return sums


def combine_metrics(per_rank: Sequence[dict[str, float]]) -> dict[str, float]:
    """The batch's metrics from every rank's sums: loss parts summed, token means weighted by loss tokens,
    ratio extremes, the slowest rank's seconds, tokens/s over all ranks."""
    loss_tokens = sum(m["loss_tokens"] for m in per_rank)
    out = {key: sum(m[key] for m in per_rank) for key in _SUMMED}
    out.update({key: sum(m[key] for m in per_rank) / max(loss_tokens, 1.0) for key in _TOKEN_MEANS})
    engine_tokens = sum(m["engine_tokens"] for m in per_rank)
    if engine_tokens:  # mean |learner - engine| log-prob of the sampled tokens (numerics of the two stacks)
        out["logprob_diff_engine"] = sum(m["logprob_diff_engine"] for m in per_rank) / engine_tokens
    seconds = max(m["seconds"] for m in per_rank)
    stages = {  # the slowest rank's; the rest of update_seconds is the policy's forward and backward
        key: max(m.get(key, 0.0) for m in per_rank) for key in ("reference_seconds", "optimizer_seconds")
    }
    tokens = sum(m["tokens"] for m in per_rank)
    out.update(
        ratio_min=min(m["ratio_min"] for m in per_rank),
        ratio_max=max(m["ratio_max"] for m in per_rank),
        grad_norm=per_rank[0]["grad_norm"],
        lr=per_rank[0]["lr"],
        update_seconds=seconds,
        **stages,
        tokens=tokens,
        response_tokens=loss_tokens,
        sequences=sum(m["sequences"] for m in per_rank),
        tokens_per_second=tokens / seconds if seconds > 0 else 0.0,
    )
    return out
