"""The weight-sync interface: what a transport's sender (in the learner, or whoever holds the weights) and its
receiver (inside each rollout actor) promise, the report of one push, and the deadline every wait of a push
runs under.

    WeightTransport  sender: `push(engines, source, version)` ships a weight source to engine actors under a
                     version and blocks until every engine loaded it; `replay` re-sends the latest weights to
                     restarted engines (None where nothing was pushed yet).
    WeightReceiver   receiver: the rollout actor forwards its generic weight methods here (`connect`,
                     `prepare`, `receive`, `finish`, `disconnect`); it loads into the actor's vLLM and knows
                     nothing of the actor's caches or version, which the actor keeps.
    Deadline         one push's deadline (`rollout.weight_sync_timeout_s`): every engine call, rendezvous and
                     broadcast of the push waits at most what is left, then raises WeightSyncTimeout.
    WeightSender     whoever the rollout pool asks for weights: the learner group, or a SourceSender (a
                     transport and a source held in the calling process).

A source is a callable that returns a fresh iterable of `(name, tensor)` in Hugging Face checkpoint names
(e.g. `model.state_dict().items()`), so it can be iterated again for a replay.

Talks to: RolloutEngine actors (`actors/rollout.py`) through their generic weight methods; the strategies are
`reload.py`, `ipc.py` and `nccl.py` beside this file.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import ray
import torch

from veason_ray.config import RolloutConfig

WeightSource = Callable[[], Iterable[tuple[str, torch.Tensor]]]
EngineCall = tuple[Any, ray.ObjectRef]  # (engine actor, the reference of one call to it)
DEFAULT_TIMEOUT_S = RolloutConfig.weight_sync_timeout_s  # the config's default, for transports built bare


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


class WeightSyncTimeout(TimeoutError):
    """A weight push passed its deadline: names the transport, the weight version, what it waited for, who did
    not answer (engines, or the learner's own NCCL side) and the seconds of the deadline."""

    def __init__(self, transport: str, version: int, waiting_for: str, unanswered: list[str], seconds: float):
        self.transport, self.version, self.waiting_for = transport, version, waiting_for
        self.unanswered, self.seconds = list(unanswered), seconds
        super().__init__(
            f"weight sync over {transport} (weight version {version}) passed its deadline of {seconds:g} s "
            f"(rollout.weight_sync_timeout_s) waiting for {waiting_for}; no answer from "
            f"{', '.join(self.unanswered)}"
        )

    def __reduce__(self) -> tuple[Any, ...]:  # Ray pickles it from the learner's actor to the driver
        return type(self), (self.transport, self.version, self.waiting_for, self.unanswered, self.seconds)


class Deadline:
    """The deadline of one push. Engine calls go through `call`/`record` (so a timeout can say whose calls are
    still out), waits through `gather`, and the learner's own blocking NCCL calls through `run`."""

    def __init__(self, transport: str, version: int, seconds: float, engines: Sequence[Any]) -> None:
        self.transport, self.version, self.seconds = transport, version, seconds
        self.end = time.monotonic() + seconds
        self.calls: list[EngineCall] = []
        self._index = {_actor_key(e): i for i, e in enumerate(engines)}  # an engine's place in this push

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def call(self, engines: Sequence[Any], method: str, *args: Any) -> list[EngineCall]:
        """`engine.<method>.remote(*args)` on every engine, recorded."""
        return self.record([(e, getattr(e, method).remote(*args)) for e in engines])

    def record(self, calls: list[EngineCall]) -> list[EngineCall]:
        self.calls += calls
        return calls

    def gather(self, calls: Sequence[EngineCall], what: str) -> list[Any]:
        """The calls' results, waiting at most until the deadline (WeightSyncTimeout names the engines whose
        calls are still out); an engine's error propagates as soon as it arrives."""
        refs = [ref for _, ref in calls]
        pending = refs
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=self.left())
            if not ready:
                raise self.expired(what, _engines_of(calls, pending))
            ray.get(ready)  # an engine's error, at once
        return ray.get(refs)

    def ask(self, engines: Sequence[Any], method: str, *args: Any) -> list[Any]:
        """`call` then `gather`: every engine's answer to `method`."""
        return self.gather(self.call(engines, method, *args), method)

    def run(self, fn: Callable[[], Any], what: str) -> Any:
        """`fn()` (a blocking call of the learner's: an NCCL rendezvous or broadcast) in a thread of its own,
        waited for until the deadline. A call still blocked then is left behind (a thread cannot be stopped; it is
        a daemon, so it does not keep the process alive) and WeightSyncTimeout names the engines whose recorded
        calls are still out, or the learner's side when all answered."""
        result: dict[str, Any] = {}

        def target() -> None:
            try:
                result["value"] = fn()
            except BaseException as error:  # handed to the waiting thread
                result["error"] = error

        thread = threading.Thread(target=target, name=f"weight-sync-{self.transport}", daemon=True)
        thread.start()
        thread.join(self.left())
        if thread.is_alive():
            refs = [ref for _, ref in self.calls]
            _, pending = ray.wait(refs, num_returns=len(refs), timeout=0) if refs else ([], [])
            late = _engines_of(self.calls, pending)
            raise self.expired(what, late, learner=not late)
        if "error" in result:
            raise result["error"]
        return result.get("value")

    def expired(self, what: str, engines: Sequence[Any], learner: bool = False) -> WeightSyncTimeout:
        names = list(dict.fromkeys(self._name(e) for e in engines))
        return WeightSyncTimeout(
            self.transport,
            self.version,
            what,
            names + (["the learner's side (rank 0)"] if learner else []),
            self.seconds,
        )

    def _name(self, engine: Any) -> str:
        key = _actor_key(engine)
        place = f"engine {self._index[key]} " if key in self._index else ""  # else one of a former NCCL group
        return f"{place}(actor {key[:8]})"


def _engines_of(calls: Sequence[EngineCall], refs: Sequence[ray.ObjectRef]) -> list[Any]:
    """The engines of the calls among `refs`."""
    chosen = set(refs)
    return [engine for engine, ref in calls if ref in chosen]


def _actor_key(engine: Any) -> str:
    return engine._actor_id.hex()


class WeightTransport(ABC):
    """Moves a weight source to engines under a version. `bucket_bytes` bounds one packed message; `timeout_s`
    bounds one push (`rollout.weight_sync_timeout_s`); `ranks_per_engine` is each engine's vLLM workers (its
    tensor-parallel size)."""

    kind: ClassVar[str]
    replay_reads_source: ClassVar[bool] = True  # a replay iterates the source again (ZeRO-3 ranks gather)
    restart_in_place_supported: ClassVar[bool] = True  # a new vLLM in a live actor can receive from it

    def __init__(
        self, bucket_bytes: int, timeout_s: float = DEFAULT_TIMEOUT_S, ranks_per_engine: int = 1
    ) -> None:
        self.bucket_bytes = int(bucket_bytes)
        self.timeout_s = float(timeout_s)
        self.ranks_per_engine = ranks_per_engine
        self.source: WeightSource | None = None
        self.version = 0
        self.phases: dict[str, float] = {}  # the current push's seconds per phase (transports that time them)

    def push(self, engines: Sequence[Any], source: WeightSource, version: int) -> SyncReport:
        """Send `source` to every engine as weight `version`; blocks until all engines have loaded it, or raises
        WeightSyncTimeout once `timeout_s` have passed."""
        start = time.perf_counter()
        self.phases = {}
        nbytes, buckets = self._send(engines, source, version, self.deadline(version, engines))
        self.source, self.version = source, version
        seconds = time.perf_counter() - start
        return SyncReport(self.kind, version, seconds, nbytes, buckets, len(engines), dict(self.phases))

    def replay(self, engines: Sequence[Any], all_engines: Sequence[Any]) -> SyncReport | None:
        """Re-send the latest weights to `engines` (restarted ones); `all_engines` is the whole pool now.
        None when nothing was pushed yet (the engines start from the checkpoint)."""
        if self.source is None:
            return None
        return self.push(engines, self.source, self.version)

    def deadline(self, version: int, engines: Sequence[Any]) -> Deadline:
        return Deadline(self.kind, version, self.timeout_s, engines)

    @abstractmethod
    def _send(
        self, engines: Sequence[Any], source: WeightSource, version: int, deadline: Deadline
    ) -> tuple[int, int]:
        """Transport-specific send under `deadline`; returns (bytes, buckets)."""


class WeightReceiver(ABC):
    """The engine side of a transport, held by a rollout actor for its current vLLM (`attach`). The actor calls
    `prepare`, then `receive` once per message, then `finish`, and afterwards resets its caches and records the
    weight version itself. `connect`/`disconnect` set up and tear down a transfer channel where one exists."""

    vllm_backend: ClassVar[str]  # vLLM's `weight_transfer_config` backend the engine is built with (GPUs)

    def __init__(self) -> None:
        self.llm: Any = None

    def attach(self, llm: Any) -> None:
        """Serve this vLLM (the actor's first, or a new one after a restart in place)."""
        self.llm = llm

    def restart_obstacle(self) -> str:
        """Why a new vLLM in this actor could not receive weights as the old one did ("" when it can)."""
        return ""

    def connect(self, info: dict[str, Any]) -> None:
        """Set up the transfer channel described by `info` (transports that have one)."""
        raise NotImplementedError(f"{type(self).__name__} has no transfer channel to connect")

    def disconnect(self) -> None:
        """Tear the transfer channel down (transports that have one)."""
        raise NotImplementedError(f"{type(self).__name__} has no transfer channel to disconnect")

    @abstractmethod
    def prepare(self) -> None:
        """A push begins."""

    @abstractmethod
    def receive(self, payload: Any) -> Any:
        """One message of the push (a bucket, or the metadata of what vLLM's transfer engine receives)."""

    @abstractmethod
    def finish(self) -> None:
        """The push is complete: the weights are loaded when this returns."""


class WeightSender(Protocol):
    """Whoever holds the weights the pool should serve: pushes them to engines as a version, and re-sends the
    latest to restarted engines (None when nothing was pushed yet)."""

    def push(self, engines: Sequence[Any], version: int) -> SyncReport: ...

    def replay(self, engines: Sequence[Any], all_engines: Sequence[Any]) -> SyncReport | None: ...


@dataclass
class SourceSender:
    """A WeightSender for weights held in the calling process: a transport and a source of named tensors."""

    transport: WeightTransport
    source: WeightSource

    def push(self, engines: Sequence[Any], version: int) -> SyncReport:
        return self.transport.push(engines, self.source, version)

    def replay(self, engines: Sequence[Any], all_engines: Sequence[Any]) -> SyncReport | None:
        return self.transport.replay(engines, all_engines)
