"""Qwen2.5-VL's RMSNorm and SwiGLU as fused kernels for training (`learner.fused_elementwise`).

A profile of the learner's micro-batch on an H100 (docs/benchmarks.md, "Where a micro-batch's time goes") puts 39%
of its device time in unfused elementwise work around the GEMMs: transformers' RMSNorm casts to float32, squares,
averages, scales and casts back in six kernels (each reading and writing the whole activation), and the MLP's
`act_fn(gate) * up` is two more, all repeated by the recompute of gradient checkpointing and mirrored in backward.
Here both are one `torch.compile`d function each (Inductor writes one fused kernel per function and direction;
`dynamic=True`, so new sequence lengths reuse it), installed per module instance as `batch_vision_windows` does,
in both towers. The arithmetic is transformers' own, op for op: equal results in float32
(tests/test_policy_forward.py); in bf16 the fused kernel keeps the intermediates in float32 registers.

The first micro-batch compiles (tens of seconds on a GPU; Inductor keeps its cache under TORCHINDUCTOR_CACHE_DIR
for the next start). Rotary embeddings are left to transformers: the language model's attention calls them as a
module-level function, which only a process-wide patch could replace.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F

SILU_CLASSES = ("SiLU", "SiLUActivation")


@torch.compile(dynamic=True)
def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Qwen2RMSNorm: float32 statistics, the product cast back to the input's dtype, then the
    weight."""
    dtype = hidden.dtype
    hidden = hidden.to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(dtype)


@torch.compile(dynamic=True)
def silu_gate(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's elementwise part: silu(gate) * up."""
    return F.silu(gate) * up


def _fused_rms_norm_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _fused_mlp_forward(self: Any, hidden_state: torch.Tensor) -> torch.Tensor:
    return self.down_proj(silu_gate(self.gate_proj(hidden_state), self.up_proj(hidden_state)))


FUSED_FORWARDS = (_fused_rms_norm_forward, _fused_mlp_forward)


def _fused_forward_for(module: torch.nn.Module) -> Any:
    """The fused forward that computes what `module` computes, or None for modules left as they are."""
    name = type(module).__name__
    if name.endswith("RMSNorm") and hasattr(module, "weight") and hasattr(module, "variance_epsilon"):
        return _fused_rms_norm_forward
    if all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj")):
        if type(getattr(module, "act_fn", None)).__name__ in SILU_CLASSES:
            return _fused_mlp_forward
    return None


def fuse_elementwise(model: Any, enabled: bool = True) -> int:
    """Give every RMSNorm and SiLU-gated MLP of `model` (a Qwen2.5-VL, possibly wrapped by DeepSpeed or peft) its
    fused forward, or with `enabled=False` take the fused forwards away again. Returns the modules changed."""
    changed = 0
    for module in model.modules():
        forward = _fused_forward_for(module)
        if forward is None:
            continue
        installed = getattr(module.__dict__.get("forward"), "__func__", None) in FUSED_FORWARDS
        if enabled and not installed:
            module.forward = types.MethodType(forward, module)
            changed += 1
        elif not enabled and installed:
            del module.forward
            changed += 1
    return changed
