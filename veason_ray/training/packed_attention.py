"""Attention over packed sequences: several sequences back to back in one row, each attending only to itself.

A packed micro-batch (`collate(..., packed=True)`) runs every layer but attention on its real tokens only, with no
padding. Attention must not cross from one sequence into the next: this module registers, with transformers'
AttentionInterface, an implementation named PACKED_ATTENTION that takes the row's sequence bounds
(`packed_row_bounds`, passed as a keyword through the model's forward, which hands it to every attention layer)
and runs causal SDPA on each sequence's slice of the row, concatenating the outputs. Exact: each sequence gets
the attention it would get alone. A call without bounds (a padded micro-batch, the export) is plain SDPA.

Per sequence rather than a block-diagonal mask over the row: a mask costs T^2 memory and SDPA computes every
masked block anyway; the slices cost what the sequences cost. `enable_packed_attention` switches a loaded
Qwen2.5-VL's language model to it (the vision tower keeps its own attention).

With `packed_bucket_tokens` > 0 (`learner.attention_bucket_tokens`) each sequence's query, key and value are
copied into tensors padded at the end to a multiple of that many tokens, and the output is cut back: causal, a
real token never attends to the padding after it, so the result is the same, and the attention kernels see a few
shapes instead of every sequence length (and, as slices of the row, strides that change with the row's length):
PyTorch's cuDNN attention keys its plans by exact sizes and strides and builds one for each new key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from veason_ray.training.sequences import round_up

PACKED_ATTENTION = "veason_packed_sdpa"


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    packed_row_bounds: Sequence[int] | None = None,
    packed_bucket_tokens: int = 0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (1, heads, T, dim), key/value (1, kv heads, T, dim);
    returns (1, T, heads, dim). `packed_row_bounds`: the offsets of the row's sequences, first 0, last T;
    `packed_bucket_tokens`: see the module docstring."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed_row_bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if query.shape[0] != 1 or packed_row_bounds[-1] != query.shape[2]:
        raise ValueError(
            f"packed attention takes one row whose sequences end at its length: row of {query.shape[2]} tokens, "
            f"batch {query.shape[0]}, bounds ending at {packed_row_bounds[-1]}"
        )
    outputs = []
    for a, b in zip(packed_row_bounds[:-1], packed_row_bounds[1:], strict=True):
        if b == a:
            continue
        q, k, v = (bucketed(x[:, :, a:b], packed_bucket_tokens) for x in (query, key, value))
        out = sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)[0]
        outputs.append(out[:, : b - a])
    return torch.cat(outputs, dim=1), None


def bucketed(x: torch.Tensor, bucket: int) -> torch.Tensor:
    """(1, heads, L, dim) -> (1, heads, round_up(L, bucket), dim), zeros after the L tokens, laid out as
    transformers lays out attention inputs (tokens outermost after the batch); `x` itself when `bucket` is 0."""
    if bucket <= 0:
        return x
    length = x.shape[2]
    tokens_first = torch.nn.functional.pad(
        x.transpose(1, 2), (0, 0, 0, 0, 0, round_up(length, bucket) - length)
    )
    return tokens_first.transpose(1, 2)


def register_packed_attention() -> None:
    """Make PACKED_ATTENTION known to transformers (idempotent); its mask is SDPA's, for unpacked calls."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)


def enable_packed_attention(model: Any) -> None:
    """Switch the language model of a loaded Qwen2.5-VL (or a peft wrapper of one) to PACKED_ATTENTION.
    It replaces SDPA only: another model.attn_implementation is refused with the fix."""
    register_packed_attention()
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    text = inner.model.language_model.config
    check_sdpa(text)
    text._attn_implementation = PACKED_ATTENTION


def check_sdpa(text_config: Any) -> None:
    """Packed rows and padded rows without their padding mask rely on SDPA's causal attention (eager attention
    would take the missing mask for none): any other implementation is refused with the fix."""
    if text_config._attn_implementation not in ("sdpa", PACKED_ATTENTION):
        raise ValueError(
            "learner.micro_batch_tokens > 0 (packed sequences) and learner.attention_bucket_tokens > 0 (causal "
            "attention without a padding mask) run SDPA, but the policy was loaded with "
            f"model.attn_implementation={text_config._attn_implementation!r}: set "
            "model.attn_implementation=sdpa, or both keys to 0"
        )


def skip_mask_creation(text_config: Any) -> dict[str, None]:
    """The attention-mask argument that tells the language model its masks are ready (None for every layer
    type): packed attention keeps sequences apart by their bounds, and a T x T mask would cost T^2 memory."""
    return dict.fromkeys(getattr(text_config, "layer_types", None) or ["full_attention"])
