"""The trained policy's weights in Hugging Face checkpoint names, one tensor at a time, and the exported folder.

`named_weights` walks the model module by module. Under ZeRO-3 each module's parameters are gathered just for
the moment its tensors are copied out (every rank must walk in step: the gather is collective), so at most one
module's full parameters exist besides the shards, never a second full copy of the model. LoRA layers come
out merged (W + scale * B @ A) under the base layer's name, which is what the rollout engine and
`from_pretrained` load; tied embeddings come out once (as the engine stores them).

`export_hf_folder` writes a folder that vLLM and transformers load directly: config, safetensors shards,
generation config, processor and chat template.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from veason_ray.training.policy_forward import causal_lm


def _gathered(params: list[torch.nn.Parameter]) -> Any:
    """ZeRO-3's gather of `params` for reading (a no-op for parameters DeepSpeed does not partition)."""
    if not any(hasattr(p, "ds_id") for p in params):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _is_lora_layer(module: torch.nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A") and hasattr(module, "get_delta_weight")


def named_weights(model: Any, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every weight of the policy in HF names, copied out (safe to keep after the next
    item), in `dtype` (None: as stored). Every rank of a ZeRO-3 group must iterate it to the end."""
    lm = causal_lm(model)
    seen: set[int] = set()
    lora_prefixes: list[str] = []
    for module_name, module in lm.named_modules():
        if any(module_name.startswith(p) for p in lora_prefixes):
            continue  # inside a LoRA layer: emitted merged with it
        prefix = f"{module_name}." if module_name else ""
        if _is_lora_layer(module):
            lora_prefixes.append(prefix)
            yield from _merged_lora(module, prefix, dtype)
            continue
        params = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        if not params:
            continue
        seen.update(id(p) for _, p in params)
        with _gathered([p for _, p in params]):
            for name, param in params:
                yield prefix + name, param.data.to(dtype or param.dtype, copy=True)


def _merged_lora(
    module: torch.nn.Module, prefix: str, dtype: torch.dtype | None
) -> Iterator[tuple[str, torch.Tensor]]:
    base = module.base_layer
    adapters = [a for a in module.active_adapters if a in module.lora_A]
    params = list(base.parameters(recurse=False))
    for adapter in adapters:
        params += list(module.lora_A[adapter].parameters()) + list(module.lora_B[adapter].parameters())
    with _gathered(params):
        weight = base.weight.data.clone()
        for adapter in adapters:
            weight += module.get_delta_weight(adapter).to(weight.dtype)
        yield prefix + "weight", weight.to(dtype or weight.dtype)
        if getattr(base, "bias", None) is not None:
            yield prefix + "bias", base.bias.data.to(dtype or base.bias.dtype, copy=True)


def export_hf_folder(
    model: Any, processor: Any, out_dir: str | Path, dtype: torch.dtype, write: bool = True
) -> Path:
    """Write the policy (LoRA merged) as a Hugging Face folder. Every rank of a ZeRO-3 group must call it
    (the weights are gathered collectively); only the rank with `write=True` writes."""
    out = Path(out_dir)
    state = {name: tensor.cpu() for name, tensor in named_weights(model, dtype)}
    if not write:
        return out
    lm = causal_lm(model)
    out.mkdir(parents=True, exist_ok=True)
    config = lm.config
    saved_dtype = getattr(config, "dtype", None)
    config.dtype = dtype
    try:
        config.save_pretrained(out)
    finally:
        config.dtype = saved_dtype
    if getattr(lm, "generation_config", None) is not None:
        lm.generation_config.save_pretrained(out)
    _save_safetensors(state, out)
    processor.save_pretrained(out)
    return out


def _save_safetensors(state: dict[str, torch.Tensor], out: Path, shard_bytes: int = 4 * 2**30) -> None:
    """Shards of at most `shard_bytes` plus the index file transformers and vLLM read."""
    import json

    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
