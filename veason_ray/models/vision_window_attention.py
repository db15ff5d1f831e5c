"""Qwen2.5-VL's vision attention with its windows batched, for training without flash-attn.

The vision tower attends within windows (112 px, 64 patches) in 28 of its 32 layers and within each image in the
other 4. transformers hands these segments to flash-attn's varlen kernel when flash-attn is installed; under
`sdpa` it loops over them in Python, one attention call per window: a 6-frame 560x560 prompt is 150 windows, so
~4,300 small calls per forward, four times that with gradient checkpointing and backward. Our GPU machines have
no flash-attn, and the learner's step time was dominated by that loop.

Here segments of equal length (all 25 windows of a 560x560 frame, every frame of a prompt) are gathered into one
batch and go through one `scaled_dot_product_attention` call per distinct length: 1 to 4 calls per layer for
any frame size (full windows, the right and bottom edge windows, the corner one). The arithmetic is the same
attention as the loop's (tests/test_policy_forward.py compares outputs and gradients).
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F


def segment_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor, scale: float
) -> torch.Tensor:
    """Bidirectional attention within each segment [cu_seqlens[i], cu_seqlens[i + 1]) of a packed sequence.
    query, key, value: (tokens, heads, head_dim); returns (tokens, heads, head_dim)."""
    starts = cu_seqlens[:-1].tolist()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    by_length: dict[int, list[int]] = {}
    for start, length in zip(starts, lengths, strict=True):
        if length > 0:
            by_length.setdefault(length, []).append(start)
    tokens = query.shape[0]
    if len(by_length) == 1:
        ((length, _),) = by_length.items()
        if length * len(starts) == tokens:  # equal segments tile the sequence: a view, no gather
            return _attend(*(x.view(-1, length, *x.shape[1:]) for x in (query, key, value)), scale).reshape(
                query.shape
            )
    out = query.new_empty(query.shape)
    offsets = torch.arange(max(by_length), device=query.device)
    for length, segment_starts in by_length.items():
        index = (torch.tensor(segment_starts, device=query.device)[:, None] + offsets[:length]).reshape(-1)
        gathered = [
            x.index_select(0, index).view(len(segment_starts), length, *x.shape[1:])
            for x in (query, key, value)
        ]
        out = out.index_copy(0, index, _attend(*gathered, scale).reshape(-1, *query.shape[1:]))
    return out


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """(segments, length, heads, dim) -> same, attention within each segment."""
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2)


def _batched_forward(
    self: Any,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_seqlen: int | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Qwen2_5_VLVisionAttention.forward with `segment_attention` in place of the per-window loop."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    tokens = hidden_states.shape[0]
    query, key, value = (
        self.qkv(hidden_states).reshape(tokens, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    )
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb_vision(query, key, cos, sin)
    out = segment_attention(query, key, value, cu_seqlens, self.scaling)
    return self.proj(out.reshape(tokens, -1))


def batch_vision_windows(model: Any) -> int:
    """Give every vision attention layer of `model` (a Qwen2.5-VL, possibly wrapped) the batched forward,
    unless flash attention is configured (its varlen kernel already does one call). Returns the number of
    layers changed."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionAttention

    changed = 0
    for module in model.modules():
        if isinstance(module, Qwen2_5_VLVisionAttention):
            if "flash" in str(getattr(module.config, "_attn_implementation", "")):
                continue
            module.forward = types.MethodType(_batched_forward, module)
            changed += 1
    return changed
