"""Which transport: `rollout.weight_transport` resolved (the one place "auto" is decided), and the sender and
receiver of the resolved kind. The learner builds the sender (`make_transport`), each rollout engine the
receiver (`receiver_class`) and its vLLM's weight-transfer backend from the same resolution.

Talks to: nothing; `actors/learner.py` and `actors/rollout.py` call it.
"""

from __future__ import annotations

import torch

from actors.weight_sync.interface import DEFAULT_TIMEOUT_S, WeightReceiver, WeightTransport
from actors.weight_sync.ipc import IPCReceiver, IPCTransport
from actors.weight_sync.nccl import NCCLReceiver, NCCLTransport
from actors.weight_sync.reload import ReloadReceiver, ReloadTransport

TRANSPORTS: dict[str, tuple[type[WeightTransport], type[WeightReceiver]]] = {
    "reload": (ReloadTransport, ReloadReceiver),
    "ipc": (IPCTransport, IPCReceiver),
    "nccl": (NCCLTransport, NCCLReceiver),
}


def resolve_kind(setting: str, on_gpu: bool, colocated: bool) -> str:
    """The transport `rollout.weight_transport` names. "auto": with CUDA, IPC when the learner shares the
    engines' GPUs (colocated) and NCCL when they have their own (disaggregated); reload on CPU."""
    if setting == "auto":
        return ("ipc" if colocated else "nccl") if on_gpu else "reload"
    if setting not in TRANSPORTS:
        raise ValueError(
            f"rollout.weight_transport: unknown {setting!r}; one of auto, {', '.join(TRANSPORTS)}"
        )
    return setting


def make_transport(
    setting: str,
    bucket_bytes: int,
    ranks_per_engine: int = 1,
    colocated: bool = True,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> WeightTransport:
    """The sender for `setting` in this process (CUDA decides "auto" with `colocated`); `timeout_s` is
    `rollout.weight_sync_timeout_s`."""
    sender, _ = TRANSPORTS[resolve_kind(setting, torch.cuda.is_available(), colocated)]
    return sender(bucket_bytes, timeout_s=timeout_s, ranks_per_engine=ranks_per_engine)


def receiver_class(setting: str, on_gpu: bool, colocated: bool) -> type[WeightReceiver]:
    """The receiver for `setting` in an engine (`on_gpu`: the engine's process has CUDA)."""
    return TRANSPORTS[resolve_kind(setting, on_gpu, colocated)][1]
