"""Per-token log-probabilities (and entropies) of response tokens under a Qwen2.5-VL policy.

The backbone runs over the whole padded sequence with its images (M-RoPE positions computed by the model from
the token ids, image grids and attention mask, as in generation; each distinct prompt's images encoded once);
the LM head then runs only on the positions that predict response tokens, so a 2,500-token prompt never
materialises 2,500 x vocab logits. A packed micro-batch (one row, no padding) gets each sequence's M-RoPE
positions from its prompt (`packed_position_ids`) and attention within each sequence (`packed_attention.py`);
with `learner.attention_bucket_tokens` > 0 padded rows run causal attention without their padding mask (the
padding follows every real token), their positions computed here with it (`padded_position_ids`).
Log-probs are of the raw logits (temperature 1), which is what the rollout engine reports and the paper samples
with.

Even over response positions only, float32 logits are large (8 rows x 1,024 tokens x 151,936 vocab = 5 GiB, and
softmax, entropy and their gradients as much again each). `learner.logprob_chunk_tokens` > 0 computes them
`ChunkedTokenLogprobs`' way: the head, log-softmax and entropy over that many tokens at a time, forward and
backward (the backward recomputes each chunk's logits from the saved hidden states), so only one chunk's
logits ever exist. 0 keeps the plain autograd path (every response token's logits at once).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from veason_ray.training.packed_attention import check_sdpa, skip_mask_creation
from veason_ray.training.sequences import MicroBatch


class ResponseScorer(torch.nn.Module):
    """The policy as the DeepSpeed engine wraps it: its forward returns response log-probs (and entropies).
    Going through the engine's forward matters: ZeRO-3 counts micro-batches there, and without that count
    its gradient accumulation overwrites instead of summing."""

    def __init__(self, policy: torch.nn.Module, chunk_tokens: int = 0) -> None:
        super().__init__()
        self.policy = policy
        self.chunk_tokens = chunk_tokens

    def forward(
        self, batch: MicroBatch, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return _score(causal_lm(self.policy), batch, with_entropy, self.chunk_tokens)


def causal_lm(model: Any) -> Any:
    """The Qwen2_5_VLForConditionalGeneration inside a DeepSpeed engine, a ResponseScorer and / or a peft
    wrapper (LoRA layers stay in place: calling the unwrapped model still runs them)."""
    inner = model.module if isinstance(getattr(model, "module", None), torch.nn.Module) else model
    inner = inner.policy if isinstance(inner, ResponseScorer) else inner
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def response_logprobs(
    model: Any, batch: MicroBatch, with_entropy: bool = False, chunk_tokens: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, R) float32 log-probabilities of `batch.response_ids`, and their (B, R) entropies when asked.
    Padded positions hold finite garbage; `batch.response_mask` says which count. `model` is a DeepSpeed
    engine around a ResponseScorer (called through the engine, which uses its own `chunk_tokens`) or a plain /
    peft model (`chunk_tokens` as `learner.logprob_chunk_tokens`)."""
    if isinstance(getattr(model, "module", None), ResponseScorer):
        return model(batch, with_entropy)
    return _score(causal_lm(model), batch, with_entropy, chunk_tokens)


def _score(
    lm: Any, batch: MicroBatch, with_entropy: bool, chunk_tokens: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if batch.packed:
        inputs = {
            "position_ids": packed_position_ids(lm, batch),
            "attention_mask": skip_mask_creation(lm.model.language_model.config),
            "packed_row_bounds": batch.row_bounds,
            "packed_bucket_tokens": batch.attention_bucket,
        }
    elif batch.attention_bucket > 0:  # right-padded rows: causal attention needs no padding mask
        check_sdpa(lm.model.language_model.config)
        inputs = {
            "position_ids": padded_position_ids(lm, batch),
            "attention_mask": skip_mask_creation(lm.model.language_model.config),
        }
    else:
        inputs = {"attention_mask": batch.attention_mask, **batch.token_inputs, **row_grids(batch)}
    out = lm.model(
        input_ids=batch.input_ids, inputs_embeds=input_embeddings(lm, batch), use_cache=False, **inputs
    )
    hidden = out.last_hidden_state
    if batch.packed:  # (B, R, H) from the one row
        response_hidden = hidden[0][batch.response_positions]
    else:
        index = batch.response_positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        response_hidden = hidden.gather(1, index)
    head = lm.lm_head
    # A ZeRO-3 partitioned weight is whole only inside the head's own forward: there, the plain path.
    plain_head = type(head) is torch.nn.Linear and head.bias is None and not hasattr(head.weight, "ds_status")
    if chunk_tokens > 0 and plain_head:
        rows, width = batch.response_ids.shape
        logprobs, entropy = ChunkedTokenLogprobs.apply(
            response_hidden.reshape(rows * width, -1),
            head.weight,
            batch.response_ids.reshape(-1),
            chunk_tokens,
            with_entropy,
        )
        return logprobs.view(rows, width), entropy.view(rows, width) if with_entropy else None
    logits = head(response_hidden).float()
    log_norm = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1) - log_norm
    entropy = None
    if with_entropy:
        entropy = log_norm - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logprobs, entropy


class ChunkedTokenLogprobs(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[target] and the softmax's entropy per token, `chunk` tokens at a time.

    hidden (N, H), weight (V, H) (the LM head, no bias), targets (N,). Returns (N,) log-probs and (N,) entropies
    (zeros when `with_entropy` is False) in float32 (float64 for float64 inputs): the logits are float32 casts of
    the head's output in its dtype, as `lm_head(h).float()`; only one chunk's logits exist at a time. Saved for
    backward: hidden and, per token, the log-normaliser and the entropy. Backward recomputes a chunk's logits
    and turns the incoming gradients into the logits' (d logp_t / dz = onehot_t - p, dH / dz = -p (log p + H)),
    then into hidden's and weight's (the weight's summed over chunks in float32)."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk: int,
        with_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = hidden.shape[0]
        logprobs = hidden.new_empty(tokens, dtype=torch.promote_types(hidden.dtype, torch.float32))
        log_norm = torch.empty_like(logprobs)
        entropy = torch.zeros_like(logprobs)
        for first in range(0, tokens, chunk):
            part = slice(first, first + chunk)
            logits = (hidden[part] @ weight.T).to(logprobs.dtype)
            log_norm[part] = torch.logsumexp(logits, dim=-1)
            logprobs[part] = logits.gather(-1, targets[part, None]).squeeze(-1) - log_norm[part]
            if with_entropy:
                log_p = logits.sub_(log_norm[part, None])
                entropy[part] = -(log_p.exp() * log_p).sum(-1)
        ctx.save_for_backward(hidden, weight, targets, log_norm, entropy)
        ctx.chunk, ctx.with_entropy = chunk, with_entropy
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(
        ctx: Any, grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, targets, log_norm, entropy = ctx.saved_tensors
        use_entropy = ctx.with_entropy and grad_entropy is not None
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=log_norm.dtype) if ctx.needs_input_grad[1] else None
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(log_norm)
        for first in range(0, hidden.shape[0], ctx.chunk):
            part = slice(first, first + ctx.chunk)
            log_p = (hidden[part] @ weight.T).to(log_norm.dtype).sub_(log_norm[part, None])
            p = log_p.exp()
            g = grad_logprobs[part, None]
            if use_entropy:  # -p * (g_logp + g_H * (log p + H)), the onehot term added below
                grad_logits = p.mul_(log_p.add_(entropy[part, None]).mul_(grad_entropy[part, None]).add_(g))
            else:
                grad_logits = p.mul_(g)
            grad_logits.neg_().scatter_add_(-1, targets[part, None], g)
            grad_logits = grad_logits.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[part] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += grad_logits.T @ hidden[part]
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None,
            None,
            None,
        )


def input_embeddings(lm: Any, batch: MicroBatch) -> torch.Tensor:
    """(B, L, hidden): the token embeddings with each image's features in its `<|image_pad|>` slots. The vision
    tower encodes the images of each distinct prompt once; rows sharing a prompt (a GRPO group) reuse its
    features, so their gradients sum into that one encoding."""
    embeds = lm.model.get_input_embeddings()(batch.input_ids)
    pixels = batch.vision_inputs.get("pixel_values")
    if pixels is None:
        return embeds
    grid = batch.vision_inputs["image_grid_thw"]
    per_image = lm.model.get_image_features(pixels, grid).pooler_output
    per_prompt, first = [], 0
    for count in batch.images_per_prompt:
        per_prompt.append(torch.cat(per_image[first : first + count]))
        first += count
    features = torch.cat([per_prompt[p] for p in batch.prompt_of_row]).to(embeds.dtype)
    slots = (batch.input_ids == lm.config.image_token_id).unsqueeze(-1)
    if int(slots.sum()) != features.shape[0]:
        raise ValueError(
            f"{int(slots.sum())} image tokens in the batch but {features.shape[0]} image features: the prompts "
            "were not encoded by this model's processor"
        )
    return embeds.masked_scatter(slots, features)


def packed_position_ids(lm: Any, batch: MicroBatch) -> torch.Tensor:
    """(3, 1, T) M-RoPE positions of a packed row: each sequence's as if it were alone. A prompt's come from
    the model's own `get_rope_index` (once per distinct prompt); its response's text positions continue from the
    prompt's largest, as they do in a padded row."""
    grids = per_prompt_grids(batch)
    by_prompt: dict[int, torch.Tensor] = {}
    parts = []
    bounds = batch.row_bounds
    for row, prompt in enumerate(batch.prompt_of_row):
        start, length = bounds[row], batch.prompt_lengths[row]
        if prompt not in by_prompt:
            ids = batch.input_ids[:, start : start + length]
            if grids is None or grids[prompt].numel() == 0:
                by_prompt[prompt] = torch.arange(length, device=ids.device).view(1, 1, -1).expand(3, 1, -1)
            else:
                extra = {k: v[:, start : start + length] for k, v in batch.token_inputs.items()}
                rope_index = lm.model.get_rope_index
                by_prompt[prompt] = rope_index(
                    input_ids=ids,
                    image_grid_thw=grids[prompt],
                    attention_mask=torch.ones_like(ids),
                    **accepted_keywords(rope_index, extra),
                )[0]
        positions = by_prompt[prompt]
        response = bounds[row + 1] - start - length
        after = positions.max() + 1 + torch.arange(response, device=positions.device)
        parts += [positions, after.view(1, 1, -1).expand(3, 1, -1)]
    return torch.cat(parts, dim=-1)


def padded_position_ids(lm: Any, batch: MicroBatch) -> torch.Tensor:
    """(3, B, L) M-RoPE positions of right-padded rows, from the model's own `get_rope_index` with the padding
    mask, as its forward computes them (the padding's positions are never read: no real token attends to it)."""
    grids = row_grids(batch)
    if not grids:
        rows, length = batch.input_ids.shape
        return torch.arange(length, device=batch.input_ids.device).view(1, 1, -1).expand(3, rows, -1)
    rope_index = lm.model.get_rope_index
    return rope_index(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        **grids,
        **accepted_keywords(rope_index, batch.token_inputs),
    )[0]


def accepted_keywords(function: Any, keywords: dict[str, Any]) -> dict[str, Any]:
    """The `keywords` that `function` takes (all of them if it takes **kwargs): transformers releases differ in
    which per-token inputs (e.g. `mm_token_type_ids`) `get_rope_index` reads."""
    parameters = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return keywords
    return {k: v for k, v in keywords.items() if k in parameters}


def per_prompt_grids(batch: MicroBatch) -> tuple[torch.Tensor, ...] | None:
    """`image_grid_thw` split by the batch's distinct prompts (None without images)."""
    grid = batch.vision_inputs.get("image_grid_thw")
    return None if grid is None else torch.split(grid, batch.images_per_prompt)


def row_grids(batch: MicroBatch) -> dict[str, torch.Tensor]:
    """`image_grid_thw` of every row's images in row order (what the model's M-RoPE position ids need)."""
    per_prompt = per_prompt_grids(batch)
    if per_prompt is None:
        return {}
    return {"image_grid_thw": torch.cat([per_prompt[p] for p in batch.prompt_of_row])}
