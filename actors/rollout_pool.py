"""RolloutPool: the engines of `rollout.engines` (`actors/rollout.py`), each on
`gpus_per_engine * tensor_parallel_size` (logical) GPUs, with weight versions, sleep/wake and restarts.

`generate` spreads the groups over the engines in equal contiguous chunks; a chunk whose engine fails is retried
on a restarted engine that was first re-synced to the pool's weight version (at most `max_restarts` restarts per
call). An engine fails when its actor dies, when its vLLM dies under a live actor (RolloutEngineDead: the engine
core exited or failed a step), or when a call passes `request_timeout_s` (hung: its vLLM is aborted at once).
Any other error of a call is the request's and reaches the caller.

A restart is in place where it can be (`rollout.restart_in_place`): the live actor builds a new vLLM, which
saves the process spawn and imports of a new actor. Where the actor is dead, does not answer within
`restart_in_place_timeout_s`, or cannot (NCCL weights), the actor is replaced. Either way the old vLLM is shut
down first (bounded wait), so a separate engine-core process has given its GPU memory back before the new one
starts. `last_restart` says which kind ran and where its seconds went. Weights arrive through a WeightTransport
(`actors/weight_sync.py`).

Talks to: its RolloutEngine actors, and the driver that owns the pool (pipelines/).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from actors.engine_health import RolloutEngineDead
from actors.rollout import RolloutEngine, RolloutEngineError, SleepState
from actors.weight_sync import SyncReport, WeightSource, WeightTransport
from veason_ray.config import RolloutConfig, SamplingConfig
from veason_ray.records import PromptGroup, Rollout
from veason_ray.weight_transport import WeightChecksum

log = logging.getLogger(__name__)

ENGINE_CLOSE_TIMEOUT_S = 30.0  # a live engine's vLLM stops in seconds (its control thread answers when hung)


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
    ) -> None:
        self.model_dir = str(model_dir)
        self.cfg = cfg
        self.dtype = dtype
        self.seed = seed
        self.version = 0
        self.sender: WeightSender | None = None
        self.asleep = False
        self.restarts = 0
        self.restart_seconds: list[float] = []
        self.last_restart: EngineRestart | None = None
        self._abandoned: list[ray.ObjectRef] = []  # calls of aborted engines, read once done (see `_drain`)
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
        self.engines = [self._spawn(i) for i in range(cfg.engines)]
        start = time.perf_counter()
        self.engine_info = ray.get([e.ready.remote() for e in self.engines])
        self.start_seconds = time.perf_counter() - start

    def _spawn(self, index: int, load_checkpoint: bool = True) -> Any:
        return self._actor_cls.options(**self._scheduling[index]).remote(
            self.model_dir, self.cfg, self.dtype, self.seed or 0, load_checkpoint
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
        self._drain()
        sampling = sampling or self.cfg.sampling
        n = n or self.cfg.n
        groups = list(groups)
        pending: dict[ray.ObjectRef, tuple[int, slice, float]] = {}

        def submit(engine: int, part: slice) -> None:
            ref = self.engines[engine].generate.remote(
                groups[part], sampling, n, self.seed, self.cfg.prefill_first
            )
            pending[ref] = (engine, part, time.monotonic() + self.cfg.request_timeout_s)

        for engine, part in enumerate(_split(len(groups), len(self.engines))):
            if part.stop > part.start:
                submit(engine, part)
        budget = self.cfg.max_restarts
        while pending:
            nearest = min(deadline for _, _, deadline in pending.values())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, nearest - time.monotonic()))
            failed: list[tuple[ray.ObjectRef, str]] = []
            for ref in ready:
                try:
                    rollouts = ray.get(ref)
                except RayActorError as e:
                    failed.append((ref, f"died ({type(e).__name__})"))
                    continue
                except RolloutEngineDead as e:  # a RayTaskError whose cause is the actor's RolloutEngineDead
                    failed.append((ref, f"lost its vLLM ({getattr(e, 'cause', e)})"))
                    continue
                _, part, _ = pending.pop(ref)
                yield part.start, rollouts
            now = time.monotonic()
            hung = [ref for ref, (_, _, deadline) in pending.items() if deadline <= now and ref not in ready]
            for ref in hung:  # stop them now; a restart (this call's or a later one's) replaces them
                timeout = f"a generate passed rollout.request_timeout_s={self.cfg.request_timeout_s:g}"
                self.engines[pending[ref][0]].abort_engine.remote(timeout)
            failed += [(ref, "hung") for ref in hung]
            self._abandoned += hung
            for ref, why in failed:
                engine, part, _ = pending.pop(ref)
                if budget <= 0:
                    raise RolloutEngineError(
                        f"rollout engine {engine} {why} serving groups {part.start}..{part.stop - 1}; "
                        f"the restart budget (rollout.max_restarts={self.cfg.max_restarts}) is spent"
                    )
                budget -= 1
                log.warning(
                    "rollout engine %d %s; restarting it and retrying %d groups",
                    engine,
                    why,
                    part.stop - part.start,
                )
                self.restart(engine)
                submit(engine, part)

    # ---- health ----

    def restart(self, engine: int, in_place: bool | None = None) -> float:
        """Restart engine `engine`, re-synced to the pool's weight version; returns seconds (the split:
        `last_restart`). In place when `in_place` (default `rollout.restart_in_place`) and the actor can; else
        the actor is replaced. When weights were pushed, the new vLLM skips reading the checkpoint (vLLM's
        dummy load): the replay overwrites every weight anyway."""
        start = time.perf_counter()
        resync = self.sender is not None and self.version > 0
        info, fallback = None, ""
        if self.cfg.restart_in_place if in_place is None else in_place:
            info, fallback = self._restart_in_place(engine, load_checkpoint=not resync)
        kind = "in_place" if info is not None else "new_actor"
        if info is not None:
            ready = time.perf_counter()
            split = {"stop": ready - start - info["start_seconds"], "start": info["start_seconds"]}
        else:
            if fallback:
                log.warning(
                    "rollout engine %d: no restart in place (%s); starting a new actor", engine, fallback
                )
            self._stop([self.engines[engine]])
            stopped = time.perf_counter()
            self.engines[engine] = self._spawn(engine, load_checkpoint=not resync)
            info = ray.get(self.engines[engine].ready.remote())
            ready = time.perf_counter()
            split = {"stop": stopped - start, "start": ready - stopped}
        self.engine_info[engine] = info
        if resync and self.sender.replay([self.engines[engine]], self.engines) is None:
            raise RuntimeError(  # never serve a dummy-initialised engine
                f"rollout engine {engine} restarted without its checkpoint, but the weight sender had nothing "
                f"to replay for version {self.version}"
            )
        if self.asleep:
            ray.get(self.engines[engine].sleep.remote(self.cfg.sleep_level))
        self.last_restart = EngineRestart(
            kind=kind,
            resync=time.perf_counter() - ready,
            engine_start=info["start_seconds"],
            fallback=fallback,
            **split,
        )
        self.restarts += 1
        self.restart_seconds.append(self.last_restart.seconds)
        self._drain()  # an aborted call has returned by now when the restart was in place
        return self.last_restart.seconds

    def _drain(self) -> None:
        """Read the calls of aborted engines that have ended (their RolloutEngineDead, or a late result), so
        Ray does not log them as unhandled errors when their references go."""
        if not self._abandoned:
            return
        done, self._abandoned = ray.wait(self._abandoned, num_returns=len(self._abandoned), timeout=0)
        for ref in done:
            with contextlib.suppress(RayError):
                ray.get(ref)

    def _restart_in_place(self, engine: int, load_checkpoint: bool) -> tuple[dict[str, Any] | None, str]:
        """Abort the engine's vLLM (its control thread answers even while a generate blocks the actor, and makes
        that generate return), then build a new vLLM in the actor (`restart_engine`, run after that generate).
        Returns (its `ready` info, "") or (None, why not)."""
        handle, timeout = self.engines[engine], self.cfg.restart_in_place_timeout_s
        try:
            ray.get(handle.abort_engine.remote("restarted by the pool"), timeout=ENGINE_CLOSE_TIMEOUT_S)
            return ray.get(handle.restart_engine.remote(load_checkpoint), timeout=timeout), ""
        except GetTimeoutError:
            return None, (
                f"no answer in time (abort_engine: {ENGINE_CLOSE_TIMEOUT_S:g} s, restart_engine: "
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

    def sync_weights(self, sender: WeightSender) -> SyncReport:
        """Push the sender's weights as the next weight version (the learner group is a sender). A sleeping
        pool wakes in `rollout.wake_order`: the tags up to and including "weights" before the push, the rest
        (the KV cache) after it, so old weights, new weights and the KV cache never hold memory at once."""
        order = list(self.cfg.wake_order)
        split = order.index("weights") + 1 if "weights" in order else 0
        if self.asleep:
            self.wake(order[:split])
        self.sender = sender
        report = sender.push(self.engines, self.version + 1)
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
        self._stop(self.engines)
        self.engines = []

    @staticmethod
    def _stop(engines: Sequence[Any]) -> None:
        """Stop the engines' vLLM (`abort_engine`: a separate engine core's GPU memory is free when this
        returns; a dead or stuck actor is not waited for beyond `ENGINE_CLOSE_TIMEOUT_S`), then kill their
        actors."""
        closing = [e.abort_engine.remote("stopped by the pool") for e in engines]
        deadline = time.monotonic() + ENGINE_CLOSE_TIMEOUT_S
        for ref in closing:
            try:
                ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except RayError as e:  # dead (RayActorError), hung (GetTimeoutError) or failing: killed anyway
                log.info("rollout engine not closed cleanly (%s); killing it", type(e).__name__)
        for engine in engines:
            ray.kill(engine, no_restart=True)


def _split(items: int, parts: int) -> list[slice]:
    """`parts` contiguous slices of `items`, sizes differing by at most one."""
    base, extra = divmod(items, parts)
    slices, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        slices.append(slice(start, stop))
        start = stop
    return slices


__all__ = ["EngineRestart", "RolloutPool", "SourceSender", "WeightSender"]
