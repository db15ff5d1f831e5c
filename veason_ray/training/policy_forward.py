"""Per-token log-probabilities (and entropies) of response tokens under a Qwen2.5-VL policy.

The backbone runs over the whole padded sequence with its images (M-RoPE positions computed by the model from
the token ids, image grids and attention mask, as in generation; each distinct prompt's images encoded once); the LM head then runs only on the positions
that predict response tokens, so a 2,500-token prompt never materialises 2,500 x vocab logits. Log-probs are
of the raw logits (temperature 1), which is what the rollout engine reports and the paper samples with.
"""

from __future__ import annotations

from typing import Any

import torch

from veason_ray.training.sequences import MicroBatch


class ResponseScorer(torch.nn.Module):
    """The policy as the DeepSpeed engine wraps it: its forward returns response log-probs (and entropies).
    Going through the engine's forward matters: ZeRO-3 counts micro-batches there, and without that count
    its gradient accumulation overwrites instead of summing."""

    def __init__(self, policy: torch.nn.Module) -> None:
        super().__init__()
        self.policy = policy

    def forward(
        self, batch: MicroBatch, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return _score(causal_lm(self.policy), batch, with_entropy)


def causal_lm(model: Any) -> Any:
    """The Qwen2_5_VLForConditionalGeneration inside a DeepSpeed engine, a ResponseScorer and / or a peft
    wrapper (LoRA layers stay in place: calling the unwrapped model still runs them)."""
    inner = model.module if isinstance(getattr(model, "module", None), torch.nn.Module) else model
    inner = inner.policy if isinstance(inner, ResponseScorer) else inner
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def response_logprobs(
    model: Any, batch: MicroBatch, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, R) float32 log-probabilities of `batch.response_ids`, and their (B, R) entropies when asked.
    Padded positions hold finite garbage; `batch.response_mask` says which count. `model` is a DeepSpeed
    engine around a ResponseScorer (called through the engine) or a plain / peft model."""
    if isinstance(getattr(model, "module", None), ResponseScorer):
        return model(batch, with_entropy)
    return _score(causal_lm(model), batch, with_entropy)


def _score(lm: Any, batch: MicroBatch, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    out = lm.model(
        input_ids=batch.input_ids,
        inputs_embeds=input_embeddings(lm, batch),
        attention_mask=batch.attention_mask,
        use_cache=False,
        **batch.token_inputs,
        **row_grids(batch),
    )
    hidden = out.last_hidden_state
    index = batch.response_positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    logits = lm.lm_head(hidden.gather(1, index)).float()
    log_norm = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1) - log_norm
    entropy = None
    if with_entropy:
        entropy = log_norm - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logprobs, entropy


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


def row_grids(batch: MicroBatch) -> dict[str, torch.Tensor]:
    """`image_grid_thw` of every row's images in row order (what the model's M-RoPE position ids need)."""
    grid = batch.vision_inputs.get("image_grid_thw")
    if grid is None:
        return {}
    per_prompt = torch.split(grid, batch.images_per_prompt)
    return {"image_grid_thw": torch.cat([per_prompt[p] for p in batch.prompt_of_row])}
