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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

PACKED_ATTENTION = "veason_packed_sdpa"


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    packed_row_bounds: Sequence[int] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (1, heads, T, dim), key/value (1, kv heads, T, dim);
    returns (1, T, heads, dim). `packed_row_bounds`: the offsets of the row's sequences, first 0, last T."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed_row_bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if query.shape[0] != 1 or packed_row_bounds[-1] != query.shape[2]:
        raise ValueError(
            f"packed attention takes one row whose sequences end at its length: row of {query.shape[2]} tokens, "
            f"batch {query.shape[0]}, bounds ending at {packed_row_bounds[-1]}"
        )
    outputs = [
        sdpa_attention_forward(
            module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, is_causal=True, **kwargs
        )[0]
        for a, b in zip(packed_row_bounds[:-1], packed_row_bounds[1:], strict=True)
        if b > a
    ]
    return torch.cat(outputs, dim=1), None


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
    if text._attn_implementation not in ("sdpa", PACKED_ATTENTION):
        raise ValueError(
            f"learner.micro_batch_tokens > 0 packs sequences with SDPA per sequence, but the policy was loaded "
            f"with model.attn_implementation={text._attn_implementation!r}: set model.attn_implementation=sdpa "
            "or learner.micro_batch_tokens=0 (padded micro-batches)"
        )
    text._attn_implementation = PACKED_ATTENTION


def skip_mask_creation(text_config: Any) -> dict[str, None]:
    """The attention-mask argument that tells the language model its masks are ready (None for every layer
    type): packed attention keeps sequences apart by their bounds, and a T x T mask would cost T^2 memory."""
    return dict.fromkeys(getattr(text_config, "layer_types", None) or ["full_attention"])
