"""What the IPC and NCCL transports share: vLLM's native weight-transfer API on the engine side (the worker's
transfer engine, driven through `collective_rpc`), and the learner's weights moved onto its GPU.

    NativeReceiver  receiver base: `connect` initialises the worker's transfer engine (and keeps the init info,
                    so a new vLLM after a restart in place is set up the same way), `prepare` / `receive` /
                    `finish` are vLLM's start / update / finish of one weight update, `disconnect` shuts the
                    transfer engine down. `packed` goes where the installed vLLM declares it (0.32: the init
                    info; earlier releases carried it per update).

Talks to: vLLM's worker in the rollout actor (`init_weight_transfer_engine`, `start_weight_update`,
`update_weights`, `finish_weight_update`, `shutdown_weight_transfer_engine`).
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from actors.weight_sync.interface import WeightReceiver


class NativeReceiver(WeightReceiver):
    """vLLM's native weight transfer of backend `vllm_backend`."""

    def __init__(self) -> None:
        super().__init__()
        self.init_info: dict[str, Any] | None = None  # what set up vLLM's weight transfer, if done
        self._packed_per_update: bool | None = None

    def attach(self, llm: Any) -> None:
        super().attach(llm)
        if self.init_info is not None:  # a new vLLM in the same actor: set up as the old one was
            self.connect(self.init_info)

    def connect(self, info: dict[str, Any]) -> None:
        self.init_info = dict(info)
        info = dict(info)
        self._packed_per_update = None
        if "packed" in info and not self._init_info_declares("packed"):
            self._packed_per_update = info.pop("packed")
        self.llm.collective_rpc("init_weight_transfer_engine", kwargs={"init_info": info})

    def _init_info_declares(self, field_name: str) -> bool:
        return field_name in {f.name for f in dataclasses.fields(self.init_info_class())}

    @staticmethod
    @abstractmethod
    def init_info_class() -> type:
        """The backend's worker-side init info dataclass in the installed vLLM."""

    def prepare(self) -> None:
        self.llm.collective_rpc("start_weight_update")

    def receive(self, payload: dict[str, Any]) -> None:
        if self._packed_per_update is not None:
            payload = {**payload, "packed": self._packed_per_update}
        self.llm.collective_rpc("update_weights", kwargs={"update_info": payload})

    def finish(self) -> None:
        self.llm.collective_rpc("finish_weight_update")

    def disconnect(self) -> None:
        self.llm.collective_rpc("shutdown_weight_transfer_engine")


def on_device(weights: Iterable[tuple[str, torch.Tensor]], device: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights on CUDA device `device` (copies queued without waiting)."""
    for name, tensor in weights:
        yield name, tensor.to(f"cuda:{device}", non_blocking=True)
