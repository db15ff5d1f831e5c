"""ActorSupervisor: the Ray actors of one pool, kept serving. The rollout pool (`actors/rollout_pool.py`) and the
SAM2 reward pool (`actors/reward.py`) run their calls through it; each says how its actors are made, aborted and
restarted in place, and the supervisor decides when.

The actors sit in slots. Each starts with a deadline on its `ready` call (`ready_timeout_s`). A call runs on its
own slot (pinned) or on the least busy slot that is up, with a deadline (`timeout_s`), and ends one of these ways:
    a result, or the request's own error   back to the caller as they are (the caller may `retry` it)
    died   its actor died (RayActorError: ActorDiedError, ActorUnavailableError)
    hung   it passed its deadline: the actor's work is stopped at once (the pool's `abort`, else a kill)
    lost   it raised the pool's `lost` error: the actor lives, what it serves died under it (a vLLM engine)
An actor that failed fails every call it runs and is restarted at once, while the restart allowance lasts
(`limit_restarts`; none by default): in place where the pool has a way (`restart_in_place`) and the actor lives;
else by Ray where the actor may restart (its `max_restarts`); else a new actor takes the slot (the old one is
stopped with a bounded wait, then killed). One that does not come up by its deadline is replaced again. The
pool's `restarted` hook runs before a restarted slot serves again (the rollout pool re-syncs weights there).
Each failed call runs again, on its own slot or on any slot up, while its `retries` last; else it ends with an
ActorFailure. `restarts` and `timeouts` count for the pools' metrics. Not thread-safe: one thread uses it.

Talks to: the actors of one pool, through the callables that pool passes in.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayError

log = logging.getLogger(__name__)

# a live actor stops its work in seconds (the pool's `abort` answers while a call hangs)
STOP_TIMEOUT_S = 30.0
KILL_LANDING_S = 0.05  # after a kill, the wait before asking again whether Ray's restart is up


class ActorFailure(RuntimeError):
    """A call's actor failed (`kind`: died, hung, lost, restarted; down: no actor was up) and the call does not
    run again: its retries or the restart allowance are spent. `detail`: the message without the actor's name."""

    def __init__(self, message: str, slot: int | None, kind: str, detail: str) -> None:
        super().__init__(message)
        self.slot, self.kind, self.detail = slot, kind, detail


@dataclass(eq=False)
class Call:
    """One request: `method` of a slot's actor with `args`; when returned by `wait`, how it ended (`result`, or
    `error`: the request's own error or an ActorFailure)."""

    method: str
    args: tuple[Any, ...]
    key: Any  # the caller's name for it (a ticket, a chunk's first group)
    slot: int | None  # the slot it must run on; None: the least busy slot that is up
    timeout_s: float  # each attempt's deadline, and how long it may wait for an actor to be up
    retries: int | None  # failed attempts it may run again after; None: as long as restarts are allowed
    errors: list[str] = field(default_factory=list)  # why each failed attempt failed
    result: Any = None
    error: BaseException | None = None
    on: _Slot | None = None  # where its current attempt runs
    ref: Any = None  # that attempt's ObjectRef
    deadline: float | None = None  # of that attempt, or of its wait for an actor (monotonic seconds)

    @property
    def retries_left(self) -> bool:
        """Whether it may run again after the attempts that failed so far."""
        return self.retries is None or len(self.errors) <= self.retries


@dataclass
class SlotRestart:
    """One restart of a slot: which kind, and where its seconds went."""

    slot: int
    kind: str  # "in_place" (the pool's way, in the live actor), "ray" (Ray restarted the actor), "new_actor"
    stop: float  # the old actor stopped: a failed in-place attempt, the bounded stop, the kill
    start: float  # the actor up: the in-place call, Ray's restart, or spawn + start until `ready` answered
    info: Any = None  # what `ready` (or the in-place restart) answered
    fallback: str = ""  # why not in place, where that was wanted


@dataclass(eq=False)
class _Slot:
    index: int
    handle: Any
    state: str = "starting"  # "starting" (ready_ref pending), "up", "down" (failed, not restarted yet)
    info: Any = None  # what `ready` answered last
    ready_ref: Any = None
    deadline: float | None = None  # of ready_ref
    failure: ActorFailure | None = None  # why it is down or restarting
    alive: bool = True  # its actor still runs (a restart in place is possible)
    restart: SlotRestart | None = None  # the restart in progress
    began: float = 0.0  # when that restart began
    calls: set[Call] = field(default_factory=set)


class ActorSupervisor:
    """`count` actors made by `spawn(index)` (each placed where its slot's were), each with a `ready()` method.

    name: what an actor is, for messages ("rollout engine"). ready_timeout_s: each start's deadline (None: none).
    lost: the error class(es) of a call that mean what the live actor serves died (a restart, not the caller's).
    abort(handle, reason) -> ObjectRef: stop the actor's work without killing it (answers while a call hangs).
    restart_in_place(handle) -> (ready info, "") or (None, why not); tried first when `in_place`.
    restarted(SlotRestart): runs once a restarted slot is up, before it serves again."""

    def __init__(
        self,
        spawn: Callable[[int], Any],
        count: int,
        *,
        name: str,
        ready_timeout_s: float | None = None,
        lost: type[Exception] | tuple[type[Exception], ...] = (),
        abort: Callable[[Any, str], Any] | None = None,
        restart_in_place: Callable[[Any], tuple[Any, str]] | None = None,
        in_place: bool = True,
        restarted: Callable[[SlotRestart], None] | None = None,
    ) -> None:
        self.name = name
        self._spawn, self._ready_timeout_s, self._lost = spawn, ready_timeout_s, lost
        self._abort, self._restart_in_place, self._in_place = abort, restart_in_place, in_place
        self._restarted = restarted
        self.restarts = 0  # slots restarted and up again
        self.timeouts = 0  # calls and starts that passed their deadline
        self.last_restart: SlotRestart | None = None
        self._allowance: int | None = None
        self._calls: set[Call] = set()  # submitted, not yet returned by `wait`
        self._queued: list[Call] = []
        self._done: list[Call] = []  # in completion order
        self._abandoned: list[Any] = []  # refs of failed or forgotten attempts, read once done (see `_drain`)
        self._slots = [_Slot(i, spawn(i)) for i in range(count)]
        try:
            infos = ray.get([s.handle.ready.remote() for s in self._slots], timeout=ready_timeout_s)
        except Exception:
            self.shutdown()
            raise
        for slot, info in zip(self._slots, infos, strict=True):
            slot.info, slot.state = info, "up"

    @property
    def handles(self) -> list[Any]:
        """The current actor of each slot."""
        return [slot.handle for slot in self._slots]

    @property
    def infos(self) -> list[Any]:
        """What each slot's actor answered to `ready` last."""
        return [slot.info for slot in self._slots]

    @property
    def pending(self) -> int:
        """Calls submitted (or retried) and not yet returned by `wait`."""
        return len(self._calls)

    def limit_restarts(self, count: int | None) -> None:
        """From now on, at most `count` restarts after failures (None: no limit); a failed slot beyond them
        stays down, and the calls pinned to it end with its ActorFailure."""
        self._allowance = count

    def submit(
        self,
        method: str,
        *args: Any,
        timeout_s: float,
        key: Any = None,
        slot: int | None = None,
        retries: int | None = None,
    ) -> Call:
        """Run `method(*args)` on slot `slot` (None: the least busy slot up); see `Call` for the rest."""
        call = Call(method, args, key, slot, timeout_s, retries)
        self._calls.add(call)
        self._queue(call)
        self._dispatch()
        return call

    def retry(self, call: Call, reason: str) -> bool:
        """Run a returned call again, counting a failed attempt (`reason`); False when its retries are spent."""
        call.errors.append(reason)
        if not call.retries_left:
            return False
        call.result = call.error = None
        self._calls.add(call)
        self._queue(call)
        self._dispatch()
        return True

    def wait(self, timeout_s: float | None = None) -> list[Call]:
        """The calls ended since the last `wait`, in order; blocks until one has (or `timeout_s` passes; then
        possibly []). [] at once when none is pending."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._done and self._calls:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            self._poll(remaining)
        done, self._done = self._done, []
        self._calls.difference_update(done)
        return done

    def cancel(self) -> None:
        """Forget every pending call (the results of those running are read and dropped when they come)."""
        for call in self._calls:
            self._detach(call)
        self._calls.clear()
        self._queued.clear()
        self._done.clear()

    def restart(self, index: int, in_place: bool | None = None) -> SlotRestart:
        """Restart slot `index` now and wait until it is up (outside the restart allowance); a call running on
        it runs again. `in_place`: try `restart_in_place` first (default: the constructor's `in_place`)."""
        slot = self._slots[index]
        for call in list(slot.calls):
            reason = f"{self.name} {index} restarted by its pool"
            self._detach(call)
            self._failed(call, ActorFailure(reason, index, "restarted", "restarted by its pool"))
        self._restart(slot, self._in_place if in_place is None else in_place)
        while slot.state == "starting":
            self._poll(None)
        if slot.state == "down":
            raise slot.failure
        return self.last_restart

    def shutdown(self) -> None:
        """Stop every actor (bounded waits) and kill it."""
        self.cancel()
        self._stop([slot.handle for slot in self._slots])
        self._slots = []

    # -- events -------------------------------------------------------------------------------------------

    def _poll(self, timeout_s: float | None) -> None:
        """Wait for the next event (a call's end, an actor up, a deadline) and handle every event due."""
        self._drain()
        running = [call for call in self._calls if call.ref is not None]
        starting = [slot for slot in self._slots if slot.state == "starting"]
        watched: dict[Any, Call | _Slot] = {call.ref: call for call in running}
        watched.update({slot.ready_ref: slot for slot in starting})
        deadlines = [c.deadline for c in [*running, *self._queued] if c.deadline is not None]
        deadlines += [slot.deadline for slot in starting if slot.deadline is not None]
        wait_s = timeout_s
        if deadlines:
            due = max(0.0, min(deadlines) - time.monotonic())
            wait_s = due if wait_s is None else min(wait_s, due)
        ready: list[Any] = []
        if watched:
            ready, _ = ray.wait(list(watched), num_returns=1, timeout=wait_s)
            if ready:
                ready, _ = ray.wait(list(watched), num_returns=len(watched), timeout=0)
        else:
            time.sleep(wait_s or 0.0)
        for ref in ready:
            target = watched[ref]
            if isinstance(target, _Slot):
                if target.ready_ref is ref:  # not restarted again by an event handled just before
                    self._answered(target)
            elif target.ref is ref:  # not failed over by an event handled just before
                self._finished(target)
        self._expire()
        self._dispatch()

    def _finished(self, call: Call) -> None:
        slot, ref, call.ref = call.on, call.ref, None  # read here: not abandoned when the slot fails
        try:
            result = ray.get(ref)
        except RayActorError as error:
            self._fail_slot(slot, "died", f"died ({type(error).__name__})")
        except self._lost as error:  # a RayTaskError that is also the pool's `lost` class
            self._fail_slot(slot, "lost", f"failed under its live actor ({getattr(error, 'cause', error)})")
        except Exception as error:  # noqa: BLE001 - the request's own error: the caller's to handle
            self._detach(call)
            self._end(call, error=error)
        else:
            self._detach(call)
            self._end(call, result=result)

    def _answered(self, slot: _Slot) -> None:
        """A (re)starting slot's `ready` answered: up, still restarting, or no actor to wait for."""
        try:
            info = ray.get(slot.ready_ref)
        except ActorUnavailableError:  # Ray is still restarting it (its deadline still runs)
            slot.ready_ref = slot.handle.ready.remote()
            return
        except RayError as error:
            if slot.restart.kind == "ray":  # no restart by Ray (none left, or none allowed): a new actor
                self._replace(slot)
            else:
                ray.kill(slot.handle, no_restart=True)
                self._fail_slot(slot, "died", f"did not start ({type(error).__name__}: {str(error)[:300]})")
            return
        if slot.restart.kind == "ray" and info == slot.info:  # the killed process answered before dying
            time.sleep(KILL_LANDING_S)
            slot.ready_ref = slot.handle.ready.remote()
            return
        self._up(slot, info)

    def _expire(self) -> None:
        """Starts and calls past their deadline fail (hung); calls that waited as long for an actor end."""
        now = time.monotonic()
        for slot in self._slots:
            if slot.state == "starting" and slot.deadline is not None and now >= slot.deadline:
                self._fail_slot(slot, "hung", f"did not come up in {self._ready_timeout_s:g} s")
        for call in [c for c in self._calls if c.ref is not None and now >= c.deadline]:
            if call.ref is not None:  # not failed with its slot just before
                self._fail_slot(call.on, "hung", f"hung (no answer in {call.timeout_s:g} s)")
        for call in [c for c in self._queued if c.deadline is not None and now >= c.deadline]:
            self._queued.remove(call)
            reason = f"no {self.name} was up for {call.timeout_s:g} s"
            self._failed(call, ActorFailure(reason, None, "down", reason))

    # -- failures and restarts -----------------------------------------------------------------------------

    def _fail_slot(self, slot: _Slot, kind: str, detail: str) -> None:
        """The slot's actor failed: every call on it fails, its work stops, and it is restarted if allowed."""
        failure = ActorFailure(f"{self.name} {detail}", slot.index, kind, detail)
        calls = list(slot.calls)
        log.warning("%s %d %s; %d calls on it fail", self.name, slot.index, detail, len(calls))
        for call in calls:
            self._detach(call)
        slot.alive = kind == "lost"
        if kind == "hung":
            self.timeouts += 1
            if slot.state == "up" and self._abort is not None:
                self._abandoned.append(self._abort(slot.handle, f"{detail}: stopped by its pool"))
                slot.alive = True
            else:  # a hung call: Ray restarts the actor if it may; a start that hung: never
                ray.kill(slot.handle, no_restart=slot.state == "starting")
        slot.state, slot.ready_ref, slot.failure = "down", None, failure
        for call in calls:
            self._failed(call, failure)
        self._revive(slot)

    def _failed(self, call: Call, failure: ActorFailure) -> None:
        """A failed attempt: the call runs again while its retries last, else it ends with `failure`."""
        call.errors.append(str(failure))
        if not call.retries_left:
            self._end(call, error=failure)
            return
        log.info("%s call %r failed (%s); running it again", self.name, call.key, failure)
        self._queue(call)

    def _revive(self, slot: _Slot) -> None:
        """Restart a down slot while the allowance lasts (else it stays down)."""
        if self._allowance is not None:
            if self._allowance <= 0:
                return
            self._allowance -= 1
        self._restart(slot, self._in_place)

    def _restart(self, slot: _Slot, in_place: bool) -> None:
        """In place where wanted and possible; else by Ray for a dead (or killed) actor; else a new actor."""
        slot.began, fallback = time.monotonic(), ""
        if in_place and self._restart_in_place is not None:
            if not slot.alive:
                fallback = "its actor is dead"
            else:
                info, fallback = self._restart_in_place(slot.handle)
                if info is not None:
                    slot.restart = SlotRestart(slot.index, "in_place", 0.0, 0.0)
                    self._up(slot, info)
                    return
                log.warning(
                    "%s %d: no restart in place (%s); starting a new actor", self.name, slot.index, fallback
                )
        slot.restart = SlotRestart(slot.index, "ray", 0.0, 0.0, fallback=fallback)
        if slot.alive:
            self._replace(slot)
        else:
            self._ask_ready(slot)

    def _replace(self, slot: _Slot) -> None:
        """Stop and kill the slot's actor and start a new one in its place."""
        self._stop([slot.handle])
        slot.restart.kind, slot.restart.stop = "new_actor", time.monotonic() - slot.began
        slot.handle = self._spawn(slot.index)
        self._ask_ready(slot)

    def _ask_ready(self, slot: _Slot) -> None:
        slot.state, slot.ready_ref = "starting", slot.handle.ready.remote()
        if self._ready_timeout_s is not None:
            slot.deadline = time.monotonic() + self._ready_timeout_s

    def _up(self, slot: _Slot, info: Any) -> None:
        restart = slot.restart
        restart.start = time.monotonic() - slot.began - restart.stop
        restart.info = slot.info = info
        slot.state, slot.ready_ref, slot.deadline, slot.failure, slot.alive = "up", None, None, None, True
        self.restarts += 1
        self.last_restart = restart
        seconds = restart.stop + restart.start
        log.info("%s %d restarted (%s) in %.1f s", self.name, slot.index, restart.kind, seconds)
        if self._restarted is None:
            return
        try:
            self._restarted(restart)
        except Exception as error:
            detail = f"failed after its restart ({type(error).__name__}: {error})"
            slot.state = "down"
            slot.failure = ActorFailure(f"{self.name} {detail}", slot.index, "lost", detail)
            raise

    def _stop(self, handles: Sequence[Any]) -> None:
        """Stop each actor's work where the pool has a way (`abort`; a dead or stuck actor is not waited for
        beyond STOP_TIMEOUT_S), then kill it."""
        if self._abort is not None:
            closing = [self._abort(handle, "stopped by its pool") for handle in handles]
            deadline = time.monotonic() + STOP_TIMEOUT_S
            for ref in closing:
                try:
                    ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
                except RayError as error:  # dead (RayActorError), hung (GetTimeoutError) or failing
                    log.info("%s not stopped cleanly (%s); killing it", self.name, type(error).__name__)
        for handle in handles:
            ray.kill(handle, no_restart=True)

    # -- bookkeeping --------------------------------------------------------------------------------------

    def _queue(self, call: Call) -> None:
        """Wait for a slot: a pinned call as long as its slot takes to come up, any other up to its timeout."""
        call.deadline = None if call.slot is not None else time.monotonic() + call.timeout_s
        self._queued.append(call)

    def _dispatch(self) -> None:
        """Start each queued call on its slot, or the least busy slot up. A call that waits for down slots
        revives them while the allowance lasts; when all it may use stay down, it ends with their failure."""
        for call in list(self._queued):
            slots = self._slots if call.slot is None else [self._slots[call.slot]]
            for slot in slots:
                if slot.state == "down":
                    self._revive(slot)
            up = [slot for slot in slots if slot.state == "up"]
            if not up:
                if all(slot.state == "down" for slot in slots):
                    self._queued.remove(call)
                    self._end(call, error=slots[0].failure)
                continue
            slot = min(up, key=lambda s: len(s.calls))
            self._queued.remove(call)
            call.on, call.deadline = slot, time.monotonic() + call.timeout_s
            call.ref = getattr(slot.handle, call.method).remote(*call.args)
            slot.calls.add(call)

    def _detach(self, call: Call) -> None:
        """Take the call off its actor (a running attempt's result is read and dropped when it comes)."""
        if call.on is not None:
            call.on.calls.discard(call)
        if call.ref is not None:
            self._abandoned.append(call.ref)
        call.on, call.ref, call.deadline = None, None, None

    def _end(self, call: Call, result: Any = None, error: BaseException | None = None) -> None:
        call.result, call.error = result, error
        self._done.append(call)

    def _drain(self) -> None:
        """Read the abandoned refs that are done, so Ray does not log their errors as unhandled."""
        if not self._abandoned:
            return
        done, self._abandoned = ray.wait(self._abandoned, num_returns=len(self._abandoned), timeout=0)
        for ref in done:
            with contextlib.suppress(RayError):
                ray.get(ref)
