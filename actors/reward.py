"""SAM2RewardPool: the verifiable rewards of GRPO groups, on Ray actors that each hold one frozen SAM2 on a
fraction of a GPU (or, with `reward.propagator: colour`, the synthetic world's colour tracker and no model). The
GRPO driver submits each group as soon as its rollouts are generated and collects scored groups in completion
order, so reward overlaps generation.

Each `SAM2RewardWorker` batches the groups that reach it while it is busy: one shared pass per batch
(`veason_ray.models.group_scoring.score_groups`: every frame encoded once, identical objects tracked once,
objects of all groups batched through SAM2) gives every rollout exactly `rewards.score_response`.

Faults: an actor that dies is restarted by Ray (`max_restarts`), one that hangs past `timeout_s` is killed
and restarted, one that cannot restart is replaced; its groups are retried on whichever actor is up. After
`max_retries` retries a group is scored without the propagator (consistency 0, the reason in
`consistency_error` and `Scored.notes["reward_failure"]`, logged). Every submitted group comes back; nothing
blocks for ever.

Talks to: the driver that owns it (pipelines/), and the object store for frames passed by reference.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from actors.request_batching import RequestBatcher
from veason_ray.config import RewardConfig, StorageConfig
from veason_ray.records import PromptGroup, Rollout, Scored
from veason_ray.rewards import score_response

log = logging.getLogger(__name__)

_ACTOR_THREADS = 64  # concurrent score() calls one actor accepts (each waits for its batch)


class SAM2RewardWorker:
    """The body of one reward actor: the mask propagator of `reward.propagator` (a SAM2 group propagator by
    default; the colour tracker on the synthetic world) and a thread that scores queued groups in batches of up
    to `max_groups_per_batch`. The pool runs it as a threaded Ray actor."""

    def __init__(
        self, reward_cfg: RewardConfig, storage: StorageConfig | None = None, cache_dir: str | None = None
    ):
        import torch

        from veason_ray.models.propagator_choice import build_mask_propagator

        self.cfg = reward_cfg
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.propagator = build_mask_propagator(
            reward_cfg, device=self.device, storage=storage, cache_dir=cache_dir, batched=True
        )
        self._batcher = RequestBatcher(
            self._score_batch, reward_cfg.max_groups_per_batch, reward_cfg.batch_wait_s, "reward-scoring"
        )

    def ready(self) -> str:
        """This incarnation of the actor: process id and device (answers once the model is loaded)."""
        return f"{os.getpid()}:{self.device}"

    def score(self, group: PromptGroup, rollouts: Sequence[Rollout]) -> list[Scored]:
        """The rewards of one group's rollouts, in order. Blocks until the batch holding it is scored."""
        from veason_ray.models.group_scoring import GroupInput

        frames = group.sample.resolve_frames(ray.get)
        return self._batcher.submit(GroupInput(group, list(rollouts), frames))

    def _score_batch(self, items: list[Any]) -> list[list[Scored]]:
        from veason_ray.models.group_scoring import score_groups

        return score_groups(items, self.propagator, self.cfg.weights)


@dataclass
class _Call:
    """One submitted group and where its current attempt runs."""

    ticket: int
    group: PromptGroup
    rollouts: list[Rollout]
    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    slot: _Slot | None = None
    ref: Any = None
    since: float = field(default_factory=time.monotonic)  # dispatched (or queued) at


@dataclass
class _Slot:
    """One actor of the pool; `ready_ref` is set while it (re)starts."""

    handle: Any
    ready_ref: Any
    since: float = field(default_factory=time.monotonic)
    calls: set[int] = field(default_factory=set)
    incarnation: str = ""  # what `ready` answered last; a restarted actor answers differently


class SAM2RewardPool:
    """`reward_cfg.actors` SAM2 reward actors, each on `gpus_per_actor` GPUs (fractional) and
    `cpus_per_actor` CPUs. `submit` a group, then `wait` / `results` for scored groups in completion order,
    or `score` a whole batch. Not thread-safe: one driver thread uses it.

    worker: the actor body (tests inject faulty subclasses of `SAM2RewardWorker`)."""

    def __init__(
        self,
        reward_cfg: RewardConfig,
        storage: StorageConfig | None = None,
        *,
        cache_dir: str | None = None,
        worker: type = SAM2RewardWorker,
        start_timeout_s: float | None = None,
        scheduling: Sequence[Any] | None = None,
    ):
        if reward_cfg.actors < 1:
            raise ValueError(f"reward.actors must be >= 1, got {reward_cfg.actors}")
        self.cfg = reward_cfg
        self._args = (reward_cfg, storage, cache_dir)
        self._remote = ray.remote(worker)
        self._start_timeout_s = start_timeout_s or reward_cfg.timeout_s
        self._tickets = itertools.count()
        self._calls: dict[int, _Call] = {}
        self._queued: list[int] = []
        self._done: list[tuple[int, list[Scored]]] = []  # (ticket, scored), in completion order
        # Per actor, Ray scheduling options (a placement-group bundle); a replacement goes where it was.
        self._scheduling = list(scheduling or [{}] * reward_cfg.actors)
        self._slots = [self._start_actor(i) for i in range(reward_cfg.actors)]
        try:
            incarnations = ray.get([slot.ready_ref for slot in self._slots], timeout=self._start_timeout_s)
        except Exception:
            self.shutdown()
            raise
        for slot, incarnation in zip(self._slots, incarnations, strict=True):
            slot.ready_ref, slot.incarnation = None, incarnation

    # -- public API -------------------------------------------------------------------------------------

    @property
    def actors(self) -> list[Any]:
        """The current actor handles (for inspection and fault-injection tests)."""
        return [slot.handle for slot in self._slots]

    @property
    def pending(self) -> int:
        """Groups submitted and not yet returned by `wait` / `results`."""
        return len(self._calls) + len(self._done)

    def submit(self, group: PromptGroup, rollouts: Sequence[Rollout]) -> int:
        """Queue one group for scoring; returns its ticket. Frames may be an array or an ObjectRef."""
        ticket = next(self._tickets)
        self._calls[ticket] = _Call(ticket, group, list(rollouts))
        self._queued.append(ticket)
        self._dispatch()
        return ticket

    def wait(self, timeout_s: float | None = None) -> list[list[Scored]]:
        """Scored groups finished since the last call, in completion order; blocks until at least one is
        finished (or `timeout_s` passes; then possibly []). [] at once when nothing is pending."""
        return [scored for _, scored in self._collect(timeout_s)]

    def _collect(self, timeout_s: float | None) -> list[tuple[int, list[Scored]]]:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._done and self._calls:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            self._poll(remaining)
        done, self._done = self._done, []
        return done

    def results(self) -> Iterator[list[Scored]]:
        """Every pending scored group, one at a time, in completion order."""
        while self.pending:
            yield from self.wait()

    def score(
        self, groups: Sequence[PromptGroup], rollouts: Sequence[Sequence[Rollout]]
    ) -> list[list[Scored]]:
        """Blocking: the scored rollouts of each group, in the order of `groups`. Call with nothing pending."""
        if self.pending:
            raise RuntimeError("score() needs an idle pool; collect pending groups with wait() first")
        tickets = [self.submit(group, rows) for group, rows in zip(groups, rollouts, strict=True)]
        order = {ticket: index for index, ticket in enumerate(tickets)}
        out: list[list[Scored]] = [[] for _ in tickets]
        while self.pending:
            for ticket, scored in self._collect(None):
                out[order[ticket]] = scored
        return out

    def shutdown(self) -> None:
        for slot in self._slots:
            ray.kill(slot.handle, no_restart=True)
        self._slots = []

    # -- scheduling -------------------------------------------------------------------------------------

    def _start_actor(self, index: int) -> _Slot:
        handle = self._remote.options(
            num_gpus=self.cfg.gpus_per_actor,
            num_cpus=self.cfg.cpus_per_actor,
            max_restarts=self.cfg.max_restarts,
            max_task_retries=0,  # retries are the pool's: counted, bounded, and free to move to another actor
            max_concurrency=_ACTOR_THREADS,
            **self._scheduling[index],
        ).remote(*self._args)
        return _Slot(handle, handle.ready.remote())

    def _dispatch(self) -> None:
        healthy = [slot for slot in self._slots if slot.ready_ref is None]
        while self._queued and healthy:
            call = self._calls[self._queued.pop(0)]
            slot = min(healthy, key=lambda s: len(s.calls))
            call.slot, call.since = slot, time.monotonic()
            call.ref = slot.handle.score.remote(call.group, call.rollouts)
            slot.calls.add(call.ticket)

    def _poll(self, timeout_s: float | None) -> None:
        """Wait for the next event (a result, an actor up, or a deadline) and handle every event due."""
        watched = {call.ref: call for call in self._calls.values() if call.ref is not None}
        watched.update({slot.ready_ref: slot for slot in self._slots if slot.ready_ref is not None})
        now = time.monotonic()
        deadlines = [call.since + self.cfg.timeout_s for call in self._calls.values()]
        deadlines += [
            slot.since + self._start_timeout_s for slot in self._slots if slot.ready_ref is not None
        ]
        wait_s = max(0.0, min(deadlines) - now) if deadlines else 0.0
        if timeout_s is not None:
            wait_s = min(wait_s, timeout_s)
        ready: list[Any] = []
        if watched:
            ready, _ = ray.wait(list(watched), num_returns=1, timeout=wait_s)
            if ready:
                ready, _ = ray.wait(list(watched), num_returns=len(watched), timeout=0)
        else:
            time.sleep(wait_s)
        for ref in ready:
            target = watched[ref]
            if isinstance(target, _Slot):
                if target.ready_ref is ref and target in self._slots:
                    self._actor_started(target)
            elif target.ref is ref:  # not failed over by an event handled just before
                self._call_finished(target)
        self._expire()
        self._dispatch()

    def _call_finished(self, call: _Call) -> None:
        try:
            scored = ray.get(call.ref)
        except RayActorError as error:
            slot = call.slot
            if slot is not None and call.ticket in slot.calls:
                self._restart_slot(slot, reason=None, died=type(error).__name__)
            else:
                self._fail(call, f"reward actor died ({type(error).__name__})")
            return
        except Exception as error:  # noqa: BLE001 - the worker raised; the actor itself is fine
            self._detach(call)
            self._fail(call, f"reward worker raised {type(error).__name__}: {str(error)[:300]}")
            return
        self._detach(call)
        for item in scored:
            item.notes.update(reward_ticket=call.ticket, reward_attempts=call.attempts + 1)
        del self._calls[call.ticket]
        self._done.append((call.ticket, scored))

    def _actor_started(self, slot: _Slot) -> None:
        try:
            incarnation = ray.get(slot.ready_ref)
            if incarnation == slot.incarnation:  # the killed process still answers: the kill has not landed
                time.sleep(0.05)
                slot.ready_ref = slot.handle.ready.remote()
                return
            slot.ready_ref, slot.incarnation = None, incarnation
        except ActorUnavailableError:  # still restarting: ask again (the start timeout still runs)
            slot.ready_ref = slot.handle.ready.remote()
        except Exception as error:  # noqa: BLE001 - cannot restart: replace it with a fresh actor
            log.warning("reward actor could not restart (%s); starting a new one", type(error).__name__)
            self._replace(slot)

    def _expire(self) -> None:
        """Calls past `timeout_s` count as failed (their actor is restarted); actors that take longer than
        the start timeout are replaced; queued calls with no actor up for `timeout_s` count as failed too."""
        now = time.monotonic()
        for call in list(self._calls.values()):
            if call.ticket not in self._calls or now - call.since < self.cfg.timeout_s:
                continue
            if call.slot is not None:
                self._restart_slot(call.slot, reason=f"a call hung for {self.cfg.timeout_s:.0f} s")
            else:
                self._queued.remove(call.ticket)
                self._fail(call, f"no reward actor was up for {self.cfg.timeout_s:.0f} s")
        for slot in list(self._slots):
            if slot.ready_ref is not None and now - slot.since >= self._start_timeout_s:
                log.warning(
                    "reward actor did not come up in %.0f s; starting a new one", self._start_timeout_s
                )
                self._replace(slot)

    def _detach(self, call: _Call) -> None:
        if call.slot is not None:
            call.slot.calls.discard(call.ticket)
        call.slot, call.ref = None, None

    def _restart_slot(self, slot: _Slot | None, reason: str | None, died: str = "") -> None:
        """Fail every call on `slot` and wait for the actor to come back. `reason` set: the actor hung, so
        kill it (Ray restarts it); None: it died (`died`: the error) and Ray is restarting it."""
        if slot is None or slot not in self._slots:
            return
        if reason is not None:
            log.warning("reward actor restarted: %s", reason)
            ray.kill(slot.handle, no_restart=False)
        for ticket in list(slot.calls):
            self._fail(self._calls[ticket], reason or f"reward actor died ({died})")
        if slot.ready_ref is None:
            slot.ready_ref, slot.since = slot.handle.ready.remote(), time.monotonic()

    def _replace(self, slot: _Slot) -> None:
        for ticket in list(slot.calls):
            self._fail(self._calls[ticket], "reward actor replaced")
        ray.kill(slot.handle, no_restart=True)
        index = self._slots.index(slot)
        self._slots[index] = self._start_actor(index)

    def _fail(self, call: _Call, reason: str) -> None:
        """Count a failed attempt: retry the group, or after `max_retries` retries score it without the propagator."""
        self._detach(call)
        call.attempts += 1
        call.errors.append(reason)
        if call.attempts <= self.cfg.max_retries:
            log.info(
                "reward group %d: attempt %d failed (%s); retrying",
                call.group.group_id,
                call.attempts,
                reason,
            )
            call.since = time.monotonic()
            self._queued.append(call.ticket)
            return
        message = f"reward pool gave up after {call.attempts} attempts: {'; '.join(call.errors)}"
        log.error("reward group %d (%s): %s", call.group.group_id, call.group.sample.key, message)
        del self._calls[call.ticket]
        self._done.append((call.ticket, self._without_sam2(call, message)))

    def _without_sam2(self, call: _Call, message: str) -> list[Scored]:
        sample = call.group.sample
        out = []
        for rollout in call.rollouts:
            reward = score_response(
                rollout.text,
                frame_indices=sample.frame_indices,
                gt_masks=sample.gt_masks_560,
                gt_boxes=sample.gt_boxes_560,
                weights=self.cfg.weights,
            )
            if reward.consistency_error is not None:  # the propagator was needed: say why it is missing
                reward = dataclasses.replace(reward, consistency_error=message)
            notes = {
                "reward_ticket": call.ticket,
                "reward_attempts": call.attempts,
                "reward_failure": message,
            }
            out.append(Scored(rollout, reward, notes))
        return out
