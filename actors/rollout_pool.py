"""RolloutPool: the engines of `rollout.engines` (`actors/rollout.py`), each on
`gpus_per_engine * tensor_parallel_size` (logical) GPUs, with weight versions, sleep/wake and restarts.

`generate` spreads the groups over the engines in equal contiguous chunks; a chunk whose engine fails is retried
on a restarted engine that was first re-synced to the pool's weight version (at most `max_restarts` restarts per
call). An engine fails when its actor dies, when its vLLM dies under a live actor (RolloutEngineDead: the engine
core exited or failed a step), or when a call passes `request_timeout_s` (hung: its vLLM is aborted at once).
Any other error of a call is the request's and reaches the caller. The engines' calls, deadlines and restarts
run through an ActorSupervisor (`actors/supervisor.py`); this pool says how an engine restarts in place and
re-syncs.

A restart is in place where it can be (`rollout.restart_in_place`): the live actor builds a new vLLM, which
saves the process spawn and imports of a new actor. Where the actor is dead, does not answer within
`restart_in_place_timeout_s`, or cannot (NCCL weights), the actor is replaced. Either way the old vLLM is shut
down first (bounded wait), so a separate engine-core process has given its GPU memory back before the new one
starts. `last_restart` says which kind ran and where its seconds went. Weights arrive from a WeightSender
(`actors/weight_sync/`).

Talks to: its RolloutEngine actors (through its ActorSupervisor), and the driver that owns the pool
(pipelines/).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from actors.engine_health import RolloutEngineDead
from actors.rollout import RolloutEngine, RolloutEngineError, SleepState
from actors.supervisor import STOP_TIMEOUT_S, ActorFailure, ActorSupervisor, SlotRestart
from actors.weight_sync import SourceSender, SyncReport, WeightSender, WeightSource, WeightTransport
from veason_ray.config import RolloutConfig, SamplingConfig, StorageConfig
from veason_ray.contiguous_split import contiguous_slices
from veason_ray.records import PromptGroup, Rollout
from veason_ray.weight_transport import WeightChecksum

log = logging.getLogger(__name__)


@dataclass
class EngineRestart:
    """One engine restart: which kind, and where its seconds went."""

    kind: str  # "in_place" (a new vLLM in the live actor) or "new_actor"
    stop: float  # old vLLM stopped: abort (a hung call returning), shutdown, a failed in-place attempt
    start: float  # new engine up: vLLM's start (in place), or spawn + imports + vLLM's start (new actor)
    resync: float  # the pool's weights replayed (and the engine put to sleep when the pool sleeps)
    engine_start: float  # vLLM's own start (`LLM(...)`), part of `start`
    fallback: str = ""  # why a new actor when an in-place restart was tried

    @property
    def seconds(self) -> float:
        return self.stop + self.start + self.resync


class RolloutPool:
    """`rollout.engines` RolloutEngine actors with restarts, weight versions and sleep/wake."""

    def __init__(
        self,
        model_dir: str,
        cfg: RolloutConfig,
        dtype: str = "bfloat16",
        seed: int | None = 0,
        scheduling: Sequence[dict[str, Any]] | None = None,
        colocated: bool = True,
        storage: StorageConfig | None = None,
        cache_dir: str | None = None,
    ) -> None:
        """`model_dir`: a local folder, or an s3:// URI or hub id each engine resolves on its node (`storage`,
        `cache_dir`: see RolloutEngine). `colocated`: the learner shares the engines' GPUs (placement.mode
        colocated); with `rollout.weight_transport` auto it picks the engines' side of the transport, as it does
        the learner's."""
        self.model_dir = str(model_dir)
        self.storage, self.cache_dir = storage, cache_dir
        self.cfg = cfg
        self.dtype = dtype
        self.seed = seed
        self.colocated = colocated
        self.version = 0
        self.sender: WeightSender | None = None
        self.asleep = False
        self.restart_seconds: list[float] = []
        self.last_restart: EngineRestart | None = None
        self._hang_injected = False  # rollout.inject_hang_s goes to engine 0's first actor only
        gpus = cfg.gpus_per_engine * cfg.tensor_parallel_size
        quiet = {"env_vars": {"TQDM_DISABLE": "1"}}
        # "control": a thread of its own for `abort_engine`, which must answer while a generate blocks the actor
        self._actor_cls = ray.remote(
            num_cpus=cfg.cpus_per_engine,
            num_gpus=gpus,
            max_restarts=0,
            runtime_env=quiet,
            concurrency_groups={"control": 1},
        )(RolloutEngine)
        # Per engine, Ray scheduling options (its placement-group bundle); a restart goes where it was.
        self._scheduling = list(scheduling or [{}] * cfg.engines)
        start = time.perf_counter()
        # The engines, their calls and restarts; its `restarts` and `timeouts` are the pool's fault counts.
        self.supervisor = ActorSupervisor(
            self._spawn,
            cfg.engines,
            name="rollout engine",
            lost=RolloutEngineDead,
            abort=lambda engine, reason: engine.abort_engine.remote(reason),
            restart_in_place=self._restart_in_place,
            in_place=cfg.restart_in_place,
            restarted=self._restarted,
        )
        self.start_seconds = time.perf_counter() - start

    @property
    def engines(self) -> list[Any]:
        """The engine actors (a restart may replace one)."""
        return self.supervisor.handles

    @property
    def engine_info(self) -> list[dict[str, Any]]:
        """What each engine's `ready` answered last: its start seconds, processes and weights."""
        return self.supervisor.infos

    @property
    def restarts(self) -> int:
        """Engine restarts so far."""
        return self.supervisor.restarts

    @property
    def _replays_weights(self) -> bool:
        """Weights were pushed: a restarted engine gets them replayed over the checkpoint it loaded."""
        return self.sender is not None and self.version > 0

    def _spawn(self, index: int) -> Any:
        hang = self.cfg.inject_hang_s if index == 0 and not self._hang_injected else 0.0
        self._hang_injected = self._hang_injected or index == 0
        return self._actor_cls.options(**self._scheduling[index]).remote(
            self.model_dir,
            self.cfg,
            self.dtype,
            self.seed or 0,
            self.colocated,
            hang,
            self.storage,
            self.cache_dir,
        )

    # ---- generation ----

    def generate(
        self, groups: Sequence[PromptGroup], sampling: SamplingConfig | None = None, n: int | None = None
    ) -> list[list[Rollout]]:
        """Per group (in input order), its n rollouts. Blocks until all are done or the restart budget is
        spent (RolloutEngineError)."""
        results: dict[int, list[list[Rollout]]] = dict(self.generate_stream(groups, sampling, n))
        return [rollouts for start in sorted(results) for rollouts in results[start]]

    def generate_stream(
        self, groups: Sequence[PromptGroup], sampling: SamplingConfig | None = None, n: int | None = None
    ) -> Iterator[tuple[int, list[list[Rollout]]]]:
        """As each engine finishes its chunk: (index of the chunk's first group, its groups' rollouts), so the
        caller can score a chunk while the other engines still generate."""
        sampling = sampling or self.cfg.sampling
        n = n or self.cfg.n
        groups = list(groups)
        supervisor = self.supervisor
        supervisor.limit_restarts(self.cfg.max_restarts)
        for engine, part in enumerate(contiguous_slices(len(groups), len(self.engines))):
            if part.stop > part.start:
                args = (groups[part], sampling, n, self.seed, self.cfg.prefill_first)
                timeout_s = self.cfg.request_timeout_s
                supervisor.submit("generate", *args, timeout_s=timeout_s, key=part, slot=engine)
        try:
            while supervisor.pending:
                for call in supervisor.wait():
                    part, failure = call.key, call.error
                    if isinstance(failure, ActorFailure):
                        raise RolloutEngineError(
                            f"rollout engine {failure.slot} {failure.detail} serving groups {part.start}.."
                            f"{part.stop - 1}; the restart budget "
                            f"(rollout.max_restarts={self.cfg.max_restarts}) is spent"
                        ) from failure
                    if failure is not None:  # the request's own error
                        raise failure
                    yield part.start, call.result
        finally:
            supervisor.cancel()  # the other chunks of a failed (or abandoned) call

    # ---- health ----

    def restart(self, engine: int, in_place: bool | None = None) -> float:
        """Restart engine `engine`, re-synced to the pool's weight version; returns seconds (the split:
        `last_restart`). In place when `in_place` (default `rollout.restart_in_place`) and the actor can; else
        the actor is replaced. The new vLLM loads the checkpoint, then gets the pushed weights replayed."""
        self.supervisor.restart(engine, in_place)
        return self.last_restart.seconds

    def _restarted(self, restart: SlotRestart) -> None:
        """Before a restarted engine serves: replay the pool's weights to it (and put it to sleep when the pool
        sleeps), then record where the restart's seconds went."""
        began = time.perf_counter()
        engine = self.engines[restart.slot]
        if self._replays_weights and self.sender.replay([engine], self.engines) is None:
            raise RuntimeError(  # never serve the checkpoint's weights under a later version
                f"rollout engine {restart.slot} restarted, but the weight sender had nothing to replay for "
                f"version {self.version}"
            )
        if self.asleep:
            ray.get(engine.sleep.remote(self.cfg.sleep_level))
        engine_start = restart.info["start_seconds"]
        stop, start = restart.stop, restart.start
        if restart.kind == "in_place":  # the in-place call stopped the old vLLM, then started the new one
            stop, start = stop + start - engine_start, engine_start
        resync = time.perf_counter() - began
        self.last_restart = EngineRestart(restart.kind, stop, start, resync, engine_start, restart.fallback)
        self.restart_seconds.append(self.last_restart.seconds)

    def _restart_in_place(self, engine: Any) -> tuple[dict[str, Any] | None, str]:
        """Abort the engine's vLLM (its control thread answers even while a generate blocks the actor, and makes
        that generate return), then build a new vLLM in the actor (`restart_engine`, run after that generate).
        Returns (its `ready` info, "") or (None, why not)."""
        timeout = self.cfg.restart_in_place_timeout_s
        try:
            ray.get(engine.abort_engine.remote("restarted by the pool"), timeout=STOP_TIMEOUT_S)
            return ray.get(engine.restart_engine.remote(), timeout=timeout), ""
        except GetTimeoutError:
            return None, (
                f"no answer in time (abort_engine: {STOP_TIMEOUT_S:g} s, restart_engine: "
                f"rollout.restart_in_place_timeout_s={timeout:g})"
            )
        except RayActorError:
            return None, "its actor is dead"
        except RayError as e:  # restart_engine failed (e.g. NCCL weights, a broken CUDA context)
            return None, f"restart_engine failed: {getattr(e, 'cause', e)!r}"

    # ---- weights ----

    def update_weights(self, transport: WeightTransport, source: WeightSource) -> SyncReport:
        """Push `source` (weights held in this process) through `transport`; see `sync_weights`."""
        return self.sync_weights(SourceSender(transport, source))

    def sync_weights(self, sender: WeightSender, version: int | None = None) -> SyncReport:
        """Push the sender's weights as weight `version` (default: the next; a resumed run pushes its
        checkpoint's weights under the version they had). The learner group is a sender. A sleeping
        pool wakes in `rollout.wake_order`: the tags up to and including "weights" before the push, the rest
        (the KV cache) after it, so old weights, new weights and the KV cache never hold memory at once."""
        order = list(self.cfg.wake_order)
        split = order.index("weights") + 1 if "weights" in order else 0
        if self.asleep:
            self.wake(order[:split])
        self.sender = sender
        report = sender.push(self.engines, self.version + 1 if version is None else version)
        self.version = report.version
        if self.asleep:
            self.wake(order[split:])
        return report

    def weight_checksums(self) -> list[WeightChecksum]:
        return ray.get([e.weight_checksum.remote() for e in self.engines])

    # ---- colocation ----

    def sleep(self, level: int | None = None) -> list[SleepState]:
        states = ray.get(
            [e.sleep.remote(self.cfg.sleep_level if level is None else level) for e in self.engines]
        )
        self.asleep = any(s.supported for s in states)
        return states

    def wake(self, tags: list[str] | None = None) -> list[SleepState]:
        """Wake the given tags (None: all at once); the pool counts as awake once the last tag of
        `rollout.wake_order` (or all) has been woken."""
        if tags == []:
            return []
        states = ray.get([e.wake.remote(tags) for e in self.engines])
        if tags is None or tags[-1] == self.cfg.wake_order[-1]:
            self.asleep = False
        return states

    def shutdown(self) -> None:
        """Stop every engine's vLLM (bounded waits) and kill its actor."""
        self.supervisor.shutdown()


__all__ = ["EngineRestart", "RolloutPool"]
