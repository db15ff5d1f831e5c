"""The NCCL transport (disaggregated GPUs): vLLM's native NCCL weight transfer broadcasts packed buckets from the
learner (rank 0) to every engine's workers over one NCCL group.

    NCCLTransport  sender: builds the group when the set of engines changes (a restarted engine cannot join the
                   old communicator), then broadcasts; vLLM >= 0.32 through its trainer-side engine, vLLM 0.26
                   (the GPU machines' pin) through `trainer_init` / `trainer_send_weights`. The learner's own
                   rendezvous and broadcast run under the push's deadline (`Deadline.run`): a peer that never
                   joins fails the push with WeightSyncTimeout instead of hanging it.
    NCCLReceiver   receiver: vLLM's native "nccl" transfer engine (`native.py`). A new vLLM in the same actor
                   cannot join the group the learner built with the old one's workers, so an engine that joined
                   one refuses a restart in place (the pool starts a new actor, which the next push regroups).

Talks to: RolloutEngine actors (`actors/rollout.py`) through their generic weight methods, and vLLM's
`vllm.distributed.weight_transfer.nccl_engine` on the learner's side. Runs only where CUDA exists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import ray
import torch

from actors.network import free_port
from actors.weight_sync.interface import (
    DEFAULT_TIMEOUT_S,
    Deadline,
    EngineCall,
    SyncReport,
    WeightSource,
    WeightSyncTimeout,
    WeightTransport,
)
from actors.weight_sync.native import NativeReceiver, on_device


class _PoolClient:
    """vLLM's `VLLMWeightSyncClient` protocol over our engine actors, under the current push's deadline; each
    engine's workers get their own NCCL rank offset (rank 0 is the learner)."""

    def __init__(self, engines: Sequence[Any], ranks_per_engine: int) -> None:
        self.engines = list(engines)
        self.ranks_per_engine = ranks_per_engine
        self.deadline: Deadline | None = None  # set by every push before it calls in here

    def connect(self, init_info: dict[str, Any]) -> list[EngineCall]:
        """Every engine's workers join the group described by `init_info` (calls recorded, not waited for)."""
        return self.deadline.record(
            [
                (e, e.connect_weights.remote({**init_info, "rank_offset": 1 + i * self.ranks_per_engine}))
                for i, e in enumerate(self.engines)
            ]
        )

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.deadline.gather(self.connect(init_info), "the NCCL group's rendezvous (engines)")

    def start_weight_update(self) -> None:
        self.deadline.ask(self.engines, "prepare_weights")

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.deadline.ask(self.engines, "receive_weights", update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        version = int(weight_version) if weight_version is not None else None
        self.deadline.ask(self.engines, "finish_weights", version)


class NCCLTransport(WeightTransport):
    """Packed NCCL broadcast from the learner (rank 0) to every engine's workers, through vLLM's native NCCL
    weight transfer."""

    kind = "nccl"
    restart_in_place_supported = False

    def __init__(
        self,
        bucket_bytes: int,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        ranks_per_engine: int = 1,
        master_address: str = "",
    ) -> None:
        super().__init__(bucket_bytes, timeout_s, ranks_per_engine)
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

    def _send(
        self, engines: Sequence[Any], source: WeightSource, version: int, deadline: Deadline
    ) -> tuple[int, int]:
        from vllm.distributed.weight_transfer import nccl_engine

        self._current = source
        device = _learner_device(source())
        try:
            # vLLM's trainer side builds its communicator on the current device
            with torch.cuda.device(device):
                if hasattr(nccl_engine, "NCCLTrainerWeightTransferEngine"):
                    self._send_trainer_engine(engines, device, deadline)
                else:
                    self._send_broadcast(engines, source, version, device, deadline)
        except WeightSyncTimeout:
            self._members = []  # the group was left inside a collective: the next push builds a new one
            raise
        deadline.ask(engines, "set_weight_version", version)
        nbytes = sum(t.numel() * t.element_size() for _, t in source())
        return nbytes, max(1, -(-nbytes // self.bucket_bytes))

    def _regroup(self, engines: Sequence[Any], deadline: Deadline) -> bool:
        """Whether the NCCL group must be (re)built for `engines`; if so, the members that stay shut their side
        of the old group down (the ones that left were replaced: their actors are gone). The current client
        runs under `deadline` either way."""
        members = [e._actor_id.hex() for e in engines]
        rebuild = members != self._members
        if rebuild:
            if self._client is not None:
                staying = [e for e in self._client.engines if e._actor_id.hex() in members]
                deadline.ask(staying, "disconnect_weights")
            self._client = _PoolClient(engines, self.ranks_per_engine)
            self._members = members
        self._client.deadline = deadline
        return rebuild

    def _send_trainer_engine(self, engines: Sequence[Any], device: int, deadline: Deadline) -> None:
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
                return iter(on_device(transport._current(), torch.cuda.current_device()))

        if self._regroup(engines, deadline):
            init = NCCLTrainerInitInfo(
                master_address=self.master_address,
                master_port=free_port(),
                world_size=1 + len(engines) * self.ranks_per_engine,
                packed=True,
                packed_buffer_size_bytes=self.bucket_bytes,
                rank=0,  # the learner's rank 0 is the sender (vLLM 0.32 asks for it explicitly)
            )

            def rendezvous() -> Any:  # vLLM's client calls (the engines joining) run inside it
                return NCCLTrainerWeightTransferEngine.trainer_init(
                    init, client=self._client, source=_Source()
                )

            self._trainer = deadline.run(_on(device, rendezvous), "the NCCL group's rendezvous")
        deadline.run(_on(device, self._trainer.send_weights), "the NCCL broadcast")

    def _send_broadcast(
        self, engines: Sequence[Any], source: WeightSource, version: int, device: int, deadline: Deadline
    ) -> None:
        """vLLM 0.26 (the GPU machines' pin): no trainer-side engine; the learner joins the group with
        `trainer_init` while the engines' workers join it, and broadcasts the packed weights with
        `trainer_send_weights` while the engines receive them (`receive_weights`), each update between the
        engines' `prepare_weights` and `finish_weights`, as vLLM 0.26's own NCCL example does.
        Written against vLLM 0.26's source (vllm/distributed/weight_transfer/nccl_engine.py, nccl_common.py)."""
        from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

        if self._regroup(engines, deadline):
            info = {
                "master_address": self.master_address,
                "master_port": free_port(),
                "world_size": 1 + len(engines) * self.ranks_per_engine,
            }
            joining = self._client.connect(info)

            def rendezvous() -> Any:  # with the workers joining
                return NCCLWeightTransferEngine.trainer_init(info)

            self._trainer = deadline.run(_on(device, rendezvous), "the NCCL group's rendezvous")
            deadline.gather(joining, "the NCCL group's rendezvous (engines)")
        weights = list(on_device(source(), device))
        packing = {"packed": True, "packed_buffer_size_bytes": self.bucket_bytes, "packed_num_buffers": 2}
        update = {
            "names": [n for n, _ in weights],
            "dtype_names": [str(t.dtype).removeprefix("torch.") for _, t in weights],
            "shapes": [list(t.shape) for _, t in weights],
            **packing,
        }
        self._client.start_weight_update()
        receiving = deadline.call(engines, "receive_weights", update)

        def broadcast() -> None:  # with the engines receiving
            NCCLWeightTransferEngine.trainer_send_weights(iter(weights), {"group": self._trainer, **packing})

        deadline.run(_on(device, broadcast), "the NCCL broadcast")
        deadline.gather(receiving, "the NCCL broadcast (engines)")
        self._client.finish_weight_update(str(version))


class NCCLReceiver(NativeReceiver):
    """vLLM's native "nccl" transfer engine: the engine's workers join the learner's NCCL group."""

    vllm_backend = "nccl"

    @staticmethod
    def init_info_class() -> type:
        from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferInitInfo

        return NCCLWeightTransferInitInfo

    def restart_obstacle(self) -> str:
        if self.init_info is None:
            return ""
        return (
            "this engine's weights come over an NCCL group, which a new vLLM in the same actor cannot join; "
            "restart it as a new actor (RolloutPool.restart(engine, in_place=False))"
        )


def _on(device: int, fn: Callable[[], Any]) -> Callable[[], Any]:
    """`fn` run on CUDA device `device` (the current device is per thread; `Deadline.run` starts a new one)."""

    def call() -> Any:
        with torch.cuda.device(device):
            return fn()

    return call


def _learner_device(weights: Iterable[tuple[str, torch.Tensor]]) -> int:
    """The CUDA device of the learner's weights (the first CUDA tensor's), or the current device."""
    for _, tensor in weights:
        if tensor.is_cuda:
            return tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
    return torch.cuda.current_device()
