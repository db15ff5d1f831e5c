"""ActorSupervisor on a local Ray cluster with real actors: a result and a request's own error reach the caller
untouched; an actor that dies is restarted (by Ray where it may, else replaced) and its call runs again; a call
that hangs past its deadline has its actor stopped and restarted; a lost engine under a live actor is restarted
in place; an actor that does not come up by its deadline is stopped (replaced, after a restart); the restart
allowance and a call's retries bound what is tried, and then the call ends with the failure."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
from ray.exceptions import GetTimeoutError

from actors.supervisor import ActorFailure, ActorSupervisor


class EngineGone(RuntimeError):
    """What the actor serves died while the actor lives (a vLLM engine under a rollout actor)."""


class Worker:
    """A supervised actor. `once(name)` markers live in a folder, so a restarted actor remembers them."""

    def __init__(self, markers: str, ready_delay_s: float = 0.0) -> None:
        time.sleep(ready_delay_s)
        self.markers = Path(markers)
        self.engine, self.serving, self.aborted = 1, True, threading.Event()

    def ready(self) -> tuple[int, int]:
        return os.getpid(), self.engine

    def echo(self, value: int) -> int:
        if not self.serving:
            raise EngineGone("the engine is gone")
        return value

    def fail(self) -> None:
        raise ValueError("a bad request")

    def die(self, name: str = "") -> str:
        if not name or self._first(name):
            os._exit(1)
        return "survived"

    def hang(self, name: str) -> str:
        if self._first(name):
            time.sleep(3600)
        return "woke"

    def hang_until_aborted(self, name: str) -> str:
        if self._first(name):
            self.aborted.wait()
            raise EngineGone("aborted")
        return "served"

    def lose_engine(self) -> None:
        self.serving = False

    @ray.method(concurrency_group="control")
    def abort(self, reason: str) -> None:
        self.serving = False
        self.aborted.set()

    def restart_engine(self) -> tuple[int, int]:
        self.engine, self.serving = self.engine + 1, True
        self.aborted.clear()
        return self.ready()

    def _first(self, name: str) -> bool:
        marker = self.markers / name
        if marker.exists():
            return False
        marker.touch()
        return True


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this module
    yield
    ray.shutdown()


def worker_actor(max_restarts: int = 0):
    return ray.remote(num_cpus=0, max_restarts=max_restarts, concurrency_groups={"control": 1})(Worker)


def supervisor(tmp_path: Path, count: int = 1, max_restarts: int = 0, **kwargs) -> ActorSupervisor:
    actor = worker_actor(max_restarts)
    return ActorSupervisor(lambda index: actor.remote(str(tmp_path)), count, name="worker", **kwargs)


def ended(sup: ActorSupervisor) -> list:
    calls = []
    while sup.pending:
        calls += sup.wait(timeout_s=120)
    return calls


def test_results_and_request_errors_reach_the_caller_without_a_restart(local_ray, tmp_path):
    sup = supervisor(tmp_path, count=2)
    try:
        sup.submit("echo", 7, timeout_s=30, key="echo")
        sup.submit("fail", timeout_s=30, key="fail", slot=1)
        calls = {call.key: call for call in ended(sup)}
    finally:
        sup.shutdown()
    assert calls["echo"].result == 7 and calls["echo"].error is None
    assert isinstance(calls["fail"].error, ValueError) and "a bad request" in str(calls["fail"].error)
    assert not calls["fail"].errors and sup.restarts == 0 and sup.timeouts == 0


@pytest.mark.parametrize(("max_restarts", "kind"), [(0, "new_actor"), (1, "ray")])
def test_a_dead_actor_is_restarted_and_its_call_runs_again(local_ray, tmp_path, max_restarts, kind):
    sup = supervisor(tmp_path, max_restarts=max_restarts)
    try:
        before, (pid, _) = sup.handles[0], sup.infos[0]
        sup.submit("die", "once", timeout_s=60)
        [call] = ended(sup)
        # a dead actor that Ray restarts is "unavailable" to its calls meanwhile
        died = "ActorUnavailableError" if kind == "ray" else "ActorDiedError"
        assert call.result == "survived" and call.errors == [f"worker died ({died})"]
        assert sup.restarts == 1 and sup.last_restart.kind == kind and sup.infos[0][0] != pid
        assert (sup.handles[0] is before) == (kind == "ray")  # Ray restarts the same actor; else a new one
    finally:
        sup.shutdown()


def test_a_hung_call_is_stopped_and_runs_again_after_a_restart(local_ray, tmp_path):
    sup = supervisor(tmp_path)
    try:
        start = time.monotonic()
        sup.submit("hang", "once", timeout_s=2)
        [call] = ended(sup)
        assert call.result == "woke" and call.errors == ["worker hung (no answer in 2 s)"]
        assert sup.timeouts == 1 and sup.restarts == 1 and sup.last_restart.kind == "new_actor"
        assert time.monotonic() - start < 60
    finally:
        sup.shutdown()


def test_a_lost_or_hung_engine_under_a_live_actor_is_aborted_and_restarted_in_place(local_ray, tmp_path):
    restarted = []

    def in_place(handle):
        return ray.get(handle.restart_engine.remote(), timeout=30), ""

    sup = supervisor(
        tmp_path,
        lost=EngineGone,
        abort=lambda handle, reason: handle.abort.remote(reason),
        restart_in_place=in_place,
        restarted=restarted.append,
    )
    try:
        pid, engine = sup.infos[0]
        ray.get(sup.handles[0].lose_engine.remote())
        sup.submit("echo", 3, timeout_s=30)
        [lost] = ended(sup)
        sup.submit("hang_until_aborted", "once", timeout_s=2)
        [hung] = ended(sup)
    finally:
        sup.shutdown()
    assert lost.result == 3 and lost.errors == ["worker failed under its live actor (the engine is gone)"]
    assert hung.result == "served" and hung.errors == ["worker hung (no answer in 2 s)"]
    assert [(r.kind, r.info) for r in restarted] == [
        ("in_place", (pid, engine + 1)),
        ("in_place", (pid, engine + 2)),
    ]
    assert sup.restarts == 2 and sup.timeouts == 1


def test_the_restart_allowance_bounds_restarts_and_a_later_call_revives_the_slot(local_ray, tmp_path):
    sup = supervisor(tmp_path)
    try:
        sup.limit_restarts(0)
        sup.submit("die", timeout_s=30, slot=0)
        [call] = ended(sup)
        assert isinstance(call.error, ActorFailure) and (call.error.slot, call.error.kind) == (0, "died")
        assert sup.restarts == 0
        sup.limit_restarts(1)
        sup.submit("echo", 5, timeout_s=60, slot=0)
        [call] = ended(sup)
        assert call.result == 5 and sup.restarts == 1
    finally:
        sup.shutdown()


def test_a_call_whose_retries_are_spent_ends_with_the_failure(local_ray, tmp_path):
    sup = supervisor(tmp_path)
    try:
        sup.submit("die", timeout_s=60, retries=1)
        [call] = ended(sup)
    finally:
        sup.shutdown()
    assert isinstance(call.error, ActorFailure) and call.error.kind == "died"
    assert call.errors == ["worker died (ActorDiedError)"] * 2


def test_actors_that_do_not_come_up_in_time_are_stopped(local_ray, tmp_path):
    actor, started = worker_actor(), []

    def spawn(index: int):
        started.append(actor.remote(str(tmp_path), ready_delay_s=60))
        return started[-1]

    with pytest.raises(GetTimeoutError):
        ActorSupervisor(spawn, 1, name="worker", ready_timeout_s=1)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(started[0].ready.remote(), timeout=30)


def test_a_restarted_actor_that_does_not_come_up_in_time_is_replaced(local_ray, tmp_path):
    actor, delays = worker_actor(), [0.0, 60.0, 0.0]  # the first replacement hangs in its start

    def spawn(index: int):
        return actor.remote(str(tmp_path), ready_delay_s=delays.pop(0))

    sup = ActorSupervisor(spawn, 1, name="worker", ready_timeout_s=5)
    try:
        sup.submit("die", "once", timeout_s=60)
        [call] = ended(sup)
    finally:
        sup.shutdown()
    assert call.result == "survived" and not delays
    assert sup.timeouts == 1 and sup.restarts == 1 and sup.last_restart.kind == "new_actor"
