"""The CUDA IPC transport (colocated GPUs): each bucket is packed into one CUDA buffer on the learner's GPU and its
IPC handle is handed to vLLM's native weight-transfer API (backend "ipc", packed). The learner process must
share the GPU with the engines (colocated placement).

    IPCTransport  sender: pipelined, bucket k+1 is packed while the engines load bucket k, into a ring of two
                  `bucket_bytes` buffers, so at most two buckets are alive and a buffer is rewritten only after
                  every engine returned from `receive_weights` for the bucket it held (vLLM copies a bucket into
                  the parameters before returning). The first push to an engine initialises its transfer engine.
    IPCReceiver   receiver: vLLM's native "ipc" transfer engine (`native.py`); its set-up holds nothing outside
                  the actor, so a new vLLM after a restart in place is set up again as the old one was.

Talks to: RolloutEngine actors (`actors/rollout.py`) through their generic weight methods. Runs only where CUDA
exists; follows vLLM 0.32's API (installed here) and 0.26's (the GPU machines' pin).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

from actors.weight_sync.interface import Deadline, EngineCall, WeightSource, WeightTransport
from actors.weight_sync.native import NativeReceiver, on_device
from veason_ray.weight_transport import WeightBucket, pack_buckets


class IPCTransport(WeightTransport):
    """CUDA IPC handles of packed buckets on the learner's GPU, loaded by vLLM's native "ipc" backend."""

    kind = "ipc"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._initialised: set[str] = set()

    def _send(
        self, engines: Sequence[Any], source: WeightSource, version: int, deadline: Deadline
    ) -> tuple[int, int]:
        if not torch.cuda.is_available():
            raise RuntimeError("IPCTransport needs CUDA in the learner process (use ReloadTransport on CPU)")
        clock = time.perf_counter()

        def lap(phase: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            self.phases[phase] = self.phases.get(phase, 0.0) + now - clock
            clock = now

        fresh = [e for e in engines if e._actor_id.hex() not in self._initialised]
        deadline.ask(fresh, "connect_weights", {"packed": True})
        self._initialised.update(e._actor_id.hex() for e in fresh)
        lap("init")
        deadline.ask(engines, "prepare_weights")
        lap("start")
        nbytes, buckets = self._send_pipelined(engines, source, version, deadline)
        lap("buckets")
        deadline.ask(engines, "finish_weights", version)
        lap("finish")  # vLLM's finish_weight_update, then the engine's cache resets
        torch.cuda.empty_cache()  # the ring's memory goes back to the GPU: engines wake their KV cache next
        lap("free")
        return nbytes, buckets

    def _send_pipelined(
        self, engines: Sequence[Any], source: WeightSource, version: int, deadline: Deadline
    ) -> tuple[int, int]:
        """receive_weights of every bucket; returns when every engine loaded the last one (bytes, buckets)."""
        from torch.multiprocessing.reductions import reduce_tensor

        device = torch.cuda.current_device()
        gpu_uuid = str(torch.cuda.get_device_properties(device).uuid)
        ring = [torch.empty(self.bucket_bytes, dtype=torch.uint8, device=device) for _ in range(2)]
        # (bucket, its receive_weights calls): a bucket too large for a ring slot has a buffer of its own, which
        # must live until the engines returned too
        in_flight: deque[tuple[WeightBucket, list[EngineCall]]] = deque()
        nbytes = buckets = 0
        packing, waiting = 0.0, 0.0  # seconds packing (copies included) and blocked on the engines
        packed = pack_buckets(on_device(source(), device), self.bucket_bytes, version, ring)
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
            in_flight.append((bucket, deadline.call(engines, "receive_weights", info)))
            nbytes += bucket.nbytes
            buckets += 1
            if len(in_flight) == len(ring):
                clock = time.perf_counter()
                deadline.gather(
                    in_flight.popleft()[1], "a weight bucket"
                )  # frees the next bucket's ring slot
                waiting += time.perf_counter() - clock
        clock = time.perf_counter()
        deadline.gather([call for _, calls in in_flight for call in calls], "the last weight buckets")
        self.phases.update(pack=packing, wait=waiting + time.perf_counter() - clock)
        return nbytes, buckets


class IPCReceiver(NativeReceiver):
    """vLLM's native "ipc" transfer engine."""

    vllm_backend = "ipc"

    @staticmethod
    def init_info_class() -> type:
        from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferInitInfo

        return IPCWeightTransferInitInfo
