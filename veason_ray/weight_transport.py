"""The data side of weight sync: packing named tensors into buckets, and checksums that compare weights.

Pure torch (no ray, no vLLM), so the learner, the rollout engines and the tests share one definition of what a
bucket holds and what "the engine has the learner's weights" means. The transports that move buckets
(CUDA IPC, NCCL, vLLM's reload on CPU) live in `actors/weight_sync/`.

A bucket is one contiguous uint8 buffer holding several tensors back to back, with their names, dtypes, shapes
and byte sizes: this is the layout of vLLM's packed weight transfer (`packed_tensor.unpack_tensor` splits the
buffer by `tensor_sizes`), so an IPC bucket is handed to vLLM's own consumer unchanged. Buckets are cut at
`bucket_bytes`; a tensor larger than that travels alone in its own bucket. Never one message per tensor.
A sender that pipelines (packs the next bucket while the receivers read the previous one) passes a ring of
preallocated buffers: each bucket is written into the next one in turn, so a CUDA IPC handle is created and
opened once per buffer instead of once per bucket.

Checksums are taken over the *multiset* of weight values (float64 sum, sum of absolute values and sum of
squares), so they are equal for the learner's Hugging Face tensors and the engine's fused ones (vLLM fuses
q/k/v and gate/up projections, pads the vocabulary with zero rows and shares tied embeddings); what they do
not see is a permutation of values, which no weight update produces by accident. `engine_weight_checksum` takes
the engine's side inside vLLM's worker, reading back the weights its kernels compute with.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class WeightBucket:
    """Tensors packed back to back into one uint8 buffer. `tensor_sizes` are bytes; `version` is the weight
    version the bucket belongs to (set by the sender, 0 when unversioned)."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    tensor_sizes: list[int]
    buffer: torch.Tensor
    version: int = 0

    @property
    def nbytes(self) -> int:
        return sum(self.tensor_sizes)


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> "bfloat16" (the wire name vLLM's weight transfer uses)."""
    return str(dtype).removeprefix("torch.")


def pack_buckets(
    weights: Iterable[tuple[str, torch.Tensor]],
    bucket_bytes: int,
    version: int = 0,
    ring: Sequence[torch.Tensor] = (),
) -> Iterator[WeightBucket]:
    """Buckets of at most `bucket_bytes` bytes (a single larger tensor gets a bucket of its own), on the
    tensors' device, in the order the weights come. Tensors are copied; the inputs are left untouched.

    With `ring` (uint8 buffers on the tensors' device), bucket k's buffer is a view into ring[k % len(ring)]
    when it fits there (a freshly allocated one when it does not): the caller must be done with bucket
    k - len(ring) before it asks for bucket k."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    pending: list[tuple[str, torch.Tensor]] = []
    size = index = 0
    for name, tensor in weights:
        nbytes = tensor.numel() * tensor.element_size()
        if pending and size + nbytes > bucket_bytes:
            yield _pack(pending, version, ring[index % len(ring)] if ring else None)
            pending, size, index = [], 0, index + 1
        pending.append((name, tensor.detach()))
        size += nbytes
    if pending:
        yield _pack(pending, version, ring[index % len(ring)] if ring else None)


def _pack(items: list[tuple[str, torch.Tensor]], version: int, slot: torch.Tensor | None) -> WeightBucket:
    flat = [t.contiguous().view(-1).view(torch.uint8) for _, t in items]
    total = sum(f.numel() for f in flat)
    if slot is not None and total <= slot.numel():
        buffer = torch.cat(flat, out=slot[:total])
    else:
        buffer = torch.cat(flat)
    return WeightBucket(
        names=[name for name, _ in items],
        dtype_names=[dtype_name(t.dtype) for _, t in items],
        shapes=[list(t.shape) for _, t in items],
        tensor_sizes=[f.numel() for f in flat],
        buffer=buffer,
        version=version,
    )


def unpack_bucket(bucket: WeightBucket) -> list[tuple[str, torch.Tensor]]:
    """The bucket's tensors (views into its buffer), with their names."""
    parts = bucket.buffer[: bucket.nbytes].split(bucket.tensor_sizes)
    return [
        (name, part.view(getattr(torch, dtype)).view(shape))
        for name, dtype, shape, part in zip(
            bucket.names, bucket.dtype_names, bucket.shapes, parts, strict=True
        )
    ]


@dataclass
class WeightChecksum:
    """Order- and layout-independent moments of a set of weights (float64)."""

    total: float = 0.0
    abs_total: float = 0.0
    sq_total: float = 0.0
    tensors: int = 0
    names: list[str] = field(default_factory=list, repr=False)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        values = tensor.detach().to(torch.float64)
        self.total += float(values.sum())
        self.abs_total += float(values.abs().sum())
        self.sq_total += float(values.square().sum())
        self.tensors += 1
        self.names.append(name)

    def matches(self, other: WeightChecksum, rtol: float = 1e-9) -> bool:
        """Equal up to float64 summation-order error (relative to the sum of absolute values)."""
        scale = max(self.abs_total, other.abs_total, 1e-30)
        return (
            abs(self.total - other.total) <= rtol * scale
            and abs(self.abs_total - other.abs_total) <= rtol * scale
            and abs(self.sq_total - other.sq_total) <= rtol * max(self.sq_total, other.sq_total, 1e-30)
        )


def checksum_weights(weights: Iterable[tuple[str, torch.Tensor]]) -> WeightChecksum:
    """The checksum of named tensors, counting tensors that share storage once (tied embeddings: a learner's
    state dict holds `lm_head.weight` and `embed_tokens.weight`, the engine one of them)."""
    checksum = WeightChecksum()
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for name, tensor in weights:
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        checksum.add(name, tensor)
    return checksum


def engine_weight_checksum(model: Any) -> WeightChecksum:
    """The checksum of a vLLM model's weights as its kernels see them (runs in vLLM's worker, `apply_model`).
    Linear layers whose weights the CPU backend repacked into opaque kernels (their `weight` parameter is left
    empty) are read back by running the layer on an identity matrix: x @ W.T with x = I gives W.T exactly. A
    parameter shared by two modules (tied embeddings) counts once, as in `checksum_weights`."""
    checksum = WeightChecksum()
    seen: set[int] = set()  # tied embeddings: one parameter under two modules
    with torch.inference_mode():
        for module_name, module in model.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                if id(param) in seen:
                    continue
                seen.add(id(param))
                name = f"{module_name}.{param_name}"
                if param_name == "weight" and param.numel() == 0 and hasattr(module, "cpu_linear"):
                    size = int(module.input_size_per_partition)
                    identity = torch.eye(size, dtype=param.dtype)
                    checksum.add(name, module.cpu_linear(identity, param, None))
                elif param.numel():
                    checksum.add(name, param)
    return checksum
