"""RolloutPool: the engines of `rollout.engines` (`actors/rollout.py`), each on
`gpus_per_engine * tensor_parallel_size` (logical) GPUs, with weight versions, sleep/wake and restarts.

`generate` spreads the groups over the engines in equal contiguous chunks; a chunk whose engine dies or passes
`request_timeout_s` is retried on a restarted engine that was first re-synced to the pool's weight version (at
most `max_restarts` restarts per call). A restart or shutdown first closes the engine's vLLM (bounded wait), so
a separate engine-core process has given its GPU memory back before a replacement starts. Weights arrive through
a WeightTransport (`actors/weight_sync.py`).

Talks to: its RolloutEngine actors, and the driver that owns the pool (pipelines/).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import ray
from ray.exceptions import RayActorError, RayError

from actors.rollout import RolloutEngine, RolloutEngineError, SleepState
from actors.weight_sync import SyncReport, WeightSource, WeightTransport
from veason_ray.config import RolloutConfig, SamplingConfig
from veason_ray.records import PromptGroup, Rollout
from veason_ray.weight_transport import WeightChecksum

log = logging.getLogger(__name__)

ENGINE_CLOSE_TIMEOUT_S = 30.0  # a live engine closes in seconds; a hung one never answers


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
        self.last_restart: dict[str, float] = {}
        gpus = cfg.gpus_per_engine * cfg.tensor_parallel_size
        quiet = {"env_vars": {"TQDM_DISABLE": "1"}}
        self._actor_cls = ray.remote(
            num_cpus=cfg.cpus_per_engine, num_gpus=gpus, max_restarts=0, runtime_env=quiet
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
                    failed.append((ref, f"died: {type(e).__name__}"))
                    continue
                _, part, _ = pending.pop(ref)
                yield part.start, rollouts
            now = time.monotonic()
            failed += [(ref, "hung") for ref, (_, _, d) in pending.items() if d <= now and ref not in ready]
            for ref, why in failed:
                engine, part, _ = pending.pop(ref)
                if why == "hung":
                    ray.kill(
                        self.engines[engine], no_restart=True
                    )  # a later call finds it dead and restarts it
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

    def restart(self, engine: int) -> float:
        """Replace engine `engine` by a fresh actor re-synced to the pool's weight version; returns seconds.
        When weights were pushed, the replacement skips reading the checkpoint (vLLM's dummy load): the replay
        overwrites every weight anyway."""
        start = time.perf_counter()
        self._stop([self.engines[engine]])
        stopped = time.perf_counter()
        resync = self.sender is not None and self.version > 0
        self.engines[engine] = self._spawn(engine, load_checkpoint=not resync)
        self.engine_info[engine] = ray.get(self.engines[engine].ready.remote())
        ready = time.perf_counter()
        if resync and self.sender.replay([self.engines[engine]], self.engines) is None:
            raise RuntimeError(  # never serve a dummy-initialised engine
                f"rollout engine {engine} restarted without its checkpoint, but the weight sender had nothing "
                f"to replay for version {self.version}"
            )
        if self.asleep:
            ray.get(self.engines[engine].sleep.remote(self.cfg.sleep_level))
        seconds = time.perf_counter() - start
        self.last_restart = {  # where a restart's seconds went (the new engine's own start: engine_info)
            "stop": stopped - start,
            "start": ready - stopped,
            "resync": time.perf_counter() - ready,
        }
        self.restarts += 1
        self.restart_seconds.append(seconds)
        return seconds

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
        """Close the engines' vLLM (their GPU memory is free when this returns; a dead or hung engine is not
        waited for beyond `ENGINE_CLOSE_TIMEOUT_S`), then kill their actors."""
        closing = [e.close.remote() for e in engines]
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


__all__ = ["RolloutPool", "SourceSender", "WeightSender"]
