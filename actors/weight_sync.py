"""WeightTransport: how the learner's weights reach the rollout engines. One small interface, three transports.

    ReloadTransport  CPU (and any machine): buckets go through Ray's object store; each engine unpacks them and
                     calls vLLM's in-place `reload_weights` (the CPU backend repacks weights, so a plain
                     `load_weights` after start-up does not work there).
    IPCTransport     colocated GPUs: each bucket is packed into one CUDA buffer on the learner's GPU and its
                     CUDA IPC handle is handed to vLLM's native weight-transfer API (backend "ipc", packed).
    NCCLTransport    disaggregated GPUs: vLLM's native NCCL trainer engine broadcasts packed buckets to every
                     engine's workers over one NCCL group (the learner is rank 0).

Every push carries a weight version; engines record it on every Rollout they return, and reset their encoder,
multimodal and prefix caches after the update (in `actors/rollout.py`). Transports keep the latest source so a
restarted engine is re-synced (`replay`) without the learner's help for the reload path, and from the kept
source callable for the GPU paths.

The engine side (`engine_weight_checksum`, `with_tied_head`, `reload_weights_from_file`) runs in the rollout
actor or in vLLM's worker: it reads back what the kernels compute with, and completes what the reload path loads.

A source is a callable that returns a fresh iterable of `(name, tensor)` in Hugging Face checkpoint names
(e.g. `model.state_dict().items()`), so it can be iterated again for a replay.

Talks to: RolloutEngine actors (`actors/rollout.py`) through their weight-update methods. IPC and NCCL run only
where CUDA exists; they follow vLLM 0.32's API (installed here) and still need their first run on the GPU
machine (vLLM 0.26).
"""

from __future__ import annotations

import socket
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import ray
import torch

from veason_ray.weight_transport import WeightBucket, WeightChecksum, pack_buckets

WeightSource = Callable[[], Iterable[tuple[str, torch.Tensor]]]


@dataclass
class SyncReport:
    """What one push did: the version now on the engines, seconds, bytes and buckets sent."""

    transport: str
    version: int
    seconds: float
    nbytes: int
    buckets: int
    engines: int
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase, where the transport knows


class WeightTransport(ABC):
    """Moves a weight source to engines under a version. `bucket_bytes` bounds one packed message."""

    kind: ClassVar[str]

    def __init__(self, bucket_bytes: int) -> None:
        self.bucket_bytes = int(bucket_bytes)
        self.source: WeightSource | None = None
        self.version = 0
        self.phases: dict[str, float] = {}  # the current push's seconds per phase (transports that time them)

    def push(self, engines: Sequence[Any], source: WeightSource, version: int) -> SyncReport:
        """Send `source` to every engine as weight `version`; blocks until all engines have loaded it."""
        start = time.perf_counter()
        self.phases = {}
        nbytes, buckets = self._send(engines, source, version)
        self.source, self.version = source, version
        seconds = time.perf_counter() - start
        return SyncReport(self.kind, version, seconds, nbytes, buckets, len(engines), dict(self.phases))

    def replay(self, engines: Sequence[Any], all_engines: Sequence[Any]) -> SyncReport | None:
        """Re-send the latest weights to `engines` (restarted ones); `all_engines` is the whole pool now.
        None when nothing was pushed yet (the engines start from the checkpoint)."""
        if self.source is None:
            return None
        return self.push(engines, self.source, self.version)

    @abstractmethod
    def _send(self, engines: Sequence[Any], source: WeightSource, version: int) -> tuple[int, int]:
        """Transport-specific send; returns (bytes, buckets)."""


class ReloadTransport(WeightTransport):
    """Buckets through the object store, loaded by vLLM's `reload_weights` (works on CPU and GPU)."""

    kind = "reload"

    def __init__(self, bucket_bytes: int) -> None:
        super().__init__(bucket_bytes)
        self._bucket_refs: list[ray.ObjectRef] = []

    def _send(self, engines: Sequence[Any], source: WeightSource, version: int) -> tuple[int, int]:
        refs, nbytes = [], 0
        for bucket in pack_buckets(source(), self.bucket_bytes, version):
            bucket.buffer = bucket.buffer.cpu()
            nbytes += bucket.nbytes
            refs.append(ray.put(bucket))  # put once, read by every engine
        self._load(engines, refs, version)
        self._bucket_refs = refs
        return nbytes, len(refs)

    def replay(self, engines: Sequence[Any], all_engines: Sequence[Any]) -> SyncReport | None:
        if not self._bucket_refs:
            return None
        start = time.perf_counter()
        self._load(engines, self._bucket_refs, self.version)
        return SyncReport(self.kind, self.version, time.perf_counter() - start, 0, len(self._bucket_refs), 1)

    @staticmethod
    def _load(engines: Sequence[Any], refs: list[ray.ObjectRef], version: int) -> None:
        # An actor runs one caller's calls in order: queue every bucket at once (no round trip per bucket),
        # and load only once all arrived without error.
        calls = [e.begin_reload.remote(version) for e in engines]
        calls += [e.receive_bucket.remote(ref) for ref in refs for e in engines]
        ray.get(calls)
        ray.get([e.finish_reload.remote(version) for e in engines])


class IPCTransport(WeightTransport):
    """CUDA IPC handles of packed buckets on the learner's GPU, loaded by vLLM's native "ipc" backend.
    The learner process must share the GPU with the engines (colocated placement).

    Pipelined: bucket k+1 is packed while the engines load bucket k, into a ring of two `bucket_bytes`
    buffers, so at most two buckets are alive and a buffer is rewritten only after every engine returned from
    `native_update` for the bucket it held (vLLM copies a bucket into the parameters before returning)."""

    kind = "ipc"

    def __init__(self, bucket_bytes: int) -> None:
        super().__init__(bucket_bytes)
        self._initialised: set[str] = set()

    def _send(self, engines: Sequence[Any], source: WeightSource, version: int) -> tuple[int, int]:
        if not torch.cuda.is_available():
            raise RuntimeError("IPCTransport needs CUDA in the learner process (use ReloadTransport on CPU)")
        clock = time.perf_counter()

        def lap(phase: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            self.phases[phase] = self.phases.get(phase, 0.0) + now - clock
            clock = now

        fresh = [e for e in engines if e._actor_id.hex() not in self._initialised]
        ray.get([e.init_native_transfer.remote({"packed": True}) for e in fresh])
        self._initialised.update(e._actor_id.hex() for e in fresh)
        lap("init")
        ray.get([e.start_native_update.remote() for e in engines])
        lap("start")
        nbytes, buckets = self._send_pipelined(engines, source, version)
        lap("buckets")
        ray.get([e.finish_native_update.remote(version) for e in engines])
        lap("finish")  # vLLM's finish_weight_update, then our cache resets
        torch.cuda.empty_cache()  # the ring's memory goes back to the GPU: engines wake their KV cache next
        lap("free")
        return nbytes, buckets

    def _send_pipelined(self, engines: Sequence[Any], source: WeightSource, version: int) -> tuple[int, int]:
        """native_update of every bucket; returns when every engine loaded the last one (bytes, buckets)."""
        from torch.multiprocessing.reductions import reduce_tensor

        device = torch.cuda.current_device()
        gpu_uuid = str(torch.cuda.get_device_properties(device).uuid)
        ring = [torch.empty(self.bucket_bytes, dtype=torch.uint8, device=device) for _ in range(2)]
        # (bucket, its native_update calls): a bucket too large for a ring slot has a buffer of its own, which
        # must live until the engines returned too
        in_flight: deque[tuple[WeightBucket, list[ray.ObjectRef]]] = deque()
        nbytes = buckets = 0
        packing, waiting = 0.0, 0.0  # seconds packing (copies included) and blocked on the engines
        packed = pack_buckets(_on_device(source(), device), self.bucket_bytes, version, ring)
        while True:
            clock = time.perf_counter()
            bucket = next(packed, None)
            if bucket is None:
                break
            torch.cuda.synchronize(device)  # the buffer must be complete before another process reads it
            packing += time.perf_counter() - clock
            info = {
                "names": bucket.names,
                "dtype_names": bucket.dtype_names,
                "shapes": bucket.shapes,
                "tensor_sizes": bucket.tensor_sizes,
                "ipc_handles": {gpu_uuid: reduce_tensor(bucket.buffer)[1]},
            }
            in_flight.append((bucket, [e.native_update.remote(info) for e in engines]))
            nbytes += bucket.nbytes
            buckets += 1
            if len(in_flight) == len(ring):
                clock = time.perf_counter()
                ray.get(in_flight.popleft()[1])  # frees the ring slot the next bucket is packed into
                waiting += time.perf_counter() - clock
        clock = time.perf_counter()
        ray.get([ref for _, refs in in_flight for ref in refs])
        self.phases.update(pack=packing, wait=waiting + time.perf_counter() - clock)
        return nbytes, buckets


def _on_device(weights: Iterable[tuple[str, torch.Tensor]], device: int):
    for name, tensor in weights:
        yield name, tensor.to(f"cuda:{device}", non_blocking=True)


class _PoolClient:
    """vLLM's `VLLMWeightSyncClient` protocol over our engine actors; each engine's workers get their own
    NCCL rank offset (rank 0 is the learner)."""

    def __init__(self, engines: Sequence[Any], ranks_per_engine: int) -> None:
        self.engines = list(engines)
        self.ranks_per_engine = ranks_per_engine

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        ray.get(
            [
                e.init_native_transfer.remote({**init_info, "rank_offset": 1 + i * self.ranks_per_engine})
                for i, e in enumerate(self.engines)
            ]
        )

    def start_weight_update(self) -> None:
        ray.get([e.start_native_update.remote() for e in self.engines])

    def update_weights(self, update_info: dict[str, Any]) -> None:
        ray.get([e.native_update.remote(update_info) for e in self.engines])

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        version = int(weight_version) if weight_version is not None else None
        ray.get([e.finish_native_update.remote(version) for e in self.engines])


class NCCLTransport(WeightTransport):
    """Packed NCCL broadcast from the learner (rank 0) to every engine's workers, through vLLM's native NCCL
    trainer engine. The group is rebuilt when the set of engines changes (a restarted engine cannot join the
    old communicator)."""

    kind = "nccl"

    def __init__(self, bucket_bytes: int, ranks_per_engine: int = 1, master_address: str = "") -> None:
        super().__init__(bucket_bytes)
        self.ranks_per_engine = ranks_per_engine
        self.master_address = master_address or ray.util.get_node_ip_address()
        self._members: list[str] = []
        self._client: _PoolClient | None = None
        self._trainer: Any = None
        self._current: WeightSource | None = None

    def replay(self, engines: Sequence[Any], all_engines: Sequence[Any]) -> SyncReport | None:
        # A broadcast reaches the whole group, so a replay re-sends to every engine of the pool.
        if self.source is None:
            return None
        return self.push(all_engines, self.source, self.version)

    def _send(self, engines: Sequence[Any], source: WeightSource, version: int) -> tuple[int, int]:
        from vllm.distributed.weight_transfer import nccl_engine

        self._current = source
        device = _learner_device(source())
        with torch.cuda.device(device):  # vLLM's trainer side builds its communicator on the current device
            if hasattr(nccl_engine, "NCCLTrainerWeightTransferEngine"):
                self._send_trainer_engine(engines, version)
            else:
                self._send_broadcast(engines, source, version, device)
        ray.get([e.set_weight_version.remote(version) for e in engines])
        nbytes = sum(t.numel() * t.element_size() for _, t in source())
        return nbytes, max(1, -(-nbytes // self.bucket_bytes))

    def _regroup(self, engines: Sequence[Any]) -> bool:
        """Whether the NCCL group must be (re)built for `engines`; shuts the old members' side down if so."""
        members = [e._actor_id.hex() for e in engines]
        if members == self._members:
            return False
        if self._client is not None:
            ray.get([e.shutdown_native_transfer.remote() for e in self._client.engines])
        self._client = _PoolClient(engines, self.ranks_per_engine)
        self._members = members
        return True

    def _send_trainer_engine(self, engines: Sequence[Any], version: int) -> None:
        """vLLM >= 0.32: its trainer-side engine drives the whole update through `_PoolClient`."""
        from vllm.distributed.weight_transfer.base import ParamMeta
        from vllm.distributed.weight_transfer.base import WeightSource as VLLMWeightSource
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )

        transport = self

        class _Source(VLLMWeightSource):
            def metadata(self) -> list[ParamMeta]:
                return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in transport._current()]

            def __iter__(self):
                return iter(_on_device(transport._current(), torch.cuda.current_device()))

        if self._regroup(engines):
            init = NCCLTrainerInitInfo(
                master_address=self.master_address,
                master_port=_free_port(),
                world_size=1 + len(engines) * self.ranks_per_engine,
                packed=True,
                packed_buffer_size_bytes=self.bucket_bytes,
            )
            self._trainer = NCCLTrainerWeightTransferEngine.trainer_init(
                init, client=self._client, source=_Source()
            )
        self._trainer.send_weights()

    def _send_broadcast(
        self, engines: Sequence[Any], source: WeightSource, version: int, device: int
    ) -> None:
        """vLLM 0.26 (the GPU machines' pin): no trainer-side engine; the learner joins the group with
        `trainer_init` while the engines' workers join it, and broadcasts the packed weights with
        `trainer_send_weights` while the engines receive them (`update_weights`), each update between the
        engines' `start_weight_update` and `finish_weight_update`, as vLLM 0.26's own NCCL example does.
        Written against vLLM 0.26's source (vllm/distributed/weight_transfer/nccl_engine.py, nccl_common.py)."""
        from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

        if self._regroup(engines):
            info = {
                "master_address": self.master_address,
                "master_port": _free_port(),
                "world_size": 1 + len(engines) * self.ranks_per_engine,
            }
            joining = [
                e.init_native_transfer.remote({**info, "rank_offset": 1 + i * self.ranks_per_engine})
                for i, e in enumerate(engines)
            ]
            self._trainer = NCCLWeightTransferEngine.trainer_init(info)  # rendezvous with the workers
            ray.get(joining)
        weights = list(_on_device(source(), device))
        packing = {"packed": True, "packed_buffer_size_bytes": self.bucket_bytes, "packed_num_buffers": 2}
        update = {
            "names": [n for n, _ in weights],
            "dtype_names": [str(t.dtype).removeprefix("torch.") for _, t in weights],
            "shapes": [list(t.shape) for _, t in weights],
            **packing,
        }
        self._client.start_weight_update()
        receiving = [e.native_update.remote(update) for e in engines]
        NCCLWeightTransferEngine.trainer_send_weights(iter(weights), {"group": self._trainer, **packing})
        ray.get(receiving)
        self._client.finish_weight_update(str(version))


def _learner_device(weights: Iterable[tuple[str, torch.Tensor]]) -> int:
    """The CUDA device of the learner's weights (the first CUDA tensor's), or the current device."""
    for _, tensor in weights:
        if tensor.is_cuda:
            return tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
    return torch.cuda.current_device()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


# ---- the engine side: functions that run in vLLM's worker or on the weights it received ----


def engine_weight_checksum(model: Any) -> WeightChecksum:
    """The checksum of a vLLM model's weights as its kernels see them. Linear layers whose weights the CPU
    backend repacked into opaque kernels (their `weight` parameter is left empty) are read back by running the
    layer on an identity matrix: x @ W.T with x = I gives W.T exactly. A parameter shared by two modules
    (tied embeddings) counts once, as in `checksum_weights`."""
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


def with_tied_head(weights: list[tuple[str, Any]], tied: bool) -> list[tuple[str, Any]]:
    """The weights plus `lm_head.weight` = the embedding when the model ties them and only the embedding came
    (a learner sends a tied tensor once). vLLM's CPU backend packs the head's matrix for its GEMM kernel at load
    time, apart from the embedding it shares a parameter with; `reload_weights` repacks only the modules whose
    names it was given, so without the head's name the logits keep the old weights (measured: log-probs off by
    0.1 after one learner step, checksums equal)."""
    names = {name for name, _ in weights}
    if not tied or any(n.endswith("lm_head.weight") for n in names):
        return weights
    embed = [(n, t) for n, t in weights if n.endswith("embed_tokens.weight")]
    return weights + [("lm_head.weight", embed[0][1])] if embed else weights


def reload_weights_from_file(worker: Any, path: str) -> None:
    """Runs in vLLM's worker (`collective_rpc`): load the (name, tensor) pairs saved at `path` in place."""
    worker.reload_weights(weights_iterator=torch.load(path, mmap=True, weights_only=True))


TRANSPORTS: dict[str, type[WeightTransport]] = {
    t.kind: t for t in (ReloadTransport, IPCTransport, NCCLTransport)
}


def make_transport(
    kind: str, bucket_bytes: int, ranks_per_engine: int = 1, colocated: bool = True
) -> WeightTransport:
    """The transport named by `rollout.weight_transport`. "auto": where the learner has CUDA, IPC when it
    shares the engines' GPUs (colocated) and NCCL when they have their own (disaggregated); reload on CPU."""
    if kind == "auto":
        kind = ("ipc" if colocated else "nccl") if torch.cuda.is_available() else "reload"
    if kind not in TRANSPORTS:
        raise ValueError(f"rollout.weight_transport: unknown {kind!r}; one of auto, {', '.join(TRANSPORTS)}")
    if kind == "nccl":
        return NCCLTransport(bucket_bytes, ranks_per_engine)
    return TRANSPORTS[kind](bucket_bytes)
