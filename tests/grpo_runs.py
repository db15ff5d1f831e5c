"""GRPO runs for the fault-injection suite (tests/faults/) and the driver tests: `veason grpo` on the embedded
default (tiny models, a local Ray cluster with 2 logical GPUs, disaggregated placement, a checkpoint every step,
per-request sampling seeds) in a process group of its own, a fault injected from outside while it runs, and the
outcome compared with an uninterrupted run of the same command.

    FaultRun(command, log).start()      the run in its own session (its Ray cluster and actors in it too)
    run.kill_actor("LearnerWorker", "update")   SIGKILL an actor's process while it runs that method
    RunOutcome.read(out)                metrics, the last checkpoint's driver state, the exported weights
    assert_same_run(outcome, reference) the same steps, data and metrics (but timings and fault counts),
                                        weights within WEIGHT_TOLERANCE
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
# Every metric a faulty run may log differently from an uninterrupted one: timings, the pools' fault counts,
# and vLLM's prefix-cache counters (a restarted engine starts with an empty cache).
TIMINGS = ("time/", "throughput/", "data/samples_per_s", "data/frames_per_s", "learner/update_seconds",
           "learner/reference_seconds", "learner/optimizer_seconds", "learner/tokens_per_second")  # fmt: skip
FAULT_COUNTS = ("rollout/restarts", "rollout/timeouts", "reward/restarts", "reward/timeouts")
CACHE = ("rollout/prefix_cache", "rollout/cached_tokens", "rollout/warmup_cached_tokens")
# A faulty run against the uninterrupted run, float32 on CPU: the same batches, the same sampled responses
# (rollout.seed_requests) and the same optimizer state after a resume give the same metrics and weights up to
# the order of float sums (in practice: identical).
METRIC_TOLERANCE = 1e-6  # relative
WEIGHT_TOLERANCE = 1e-6  # absolute, per weight


def grpo_command(out: str | Path, data: Path, models: tuple[Path, Path], *extra: str) -> list[str]:
    """`veason grpo` on tests/configs/small.yaml, disaggregated on 2 logical GPUs, STEPS steps of 2 prompts x 2
    responses, a checkpoint every step, sampling seeded per request (a group's responses do not depend on
    which engine, or which restart of it, serves the group)."""
    policy, sam2 = models
    return [
        sys.executable, "-m", "pipelines.cli", "grpo", "tests/configs/small.yaml",
        f"run.output_dir={out}", f"data.root={data}", "data.num_frames=2", "data.decode_concurrency=1",
        f"model.policy={policy}", f"reward.sam2.checkpoint={sam2}",
        "placement.mode=disaggregated", "placement.num_gpus=2",
        "rollout.gpus_per_engine=1", "learner.gpus_per_worker=0.75", "reward.gpus_per_actor=0.25",
        "rollout.n=2", "rollout.sampling.max_new_tokens=16", "rollout.seed_requests=true",
        f"trainer.steps={STEPS}", "trainer.save_every=1", "trainer.prompts_per_step=2",
        "trainer.sample_images_every=0", *extra,
    ]  # fmt: skip


def grpo_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TQDM_DISABLE": "1", **extra}
    env.pop("RAY_ADDRESS", None)
    return env


class FaultRun:
    """One `veason grpo` process in a session of its own, its console in `<out's parent>/<name>.log`."""

    def __init__(self, command: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.command, self.log, self.env = command, log, env or grpo_env()
        self.process: subprocess.Popen | None = None
        self.started = self.ended = 0.0

    def start(self) -> FaultRun:
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            self.command, cwd=REPO, env=self.env, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        return self

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, what: str, ready: Callable[[], bool], timeout_s: float = 600) -> float:
        """Poll `ready` until true; the seconds since the start. Fails if the run ends first or time runs out."""
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert self.process.poll() is None, f"the run ended before {what}:\n{self.output[-4000:]}"
            assert time.monotonic() < deadline, f"no {what} within {timeout_s:g} s:\n{self.output[-4000:]}"
            time.sleep(0.2)
        return time.monotonic() - self.started

    def finish(self, timeout_s: float = 900) -> int:
        """Wait for the run to end; its exit code. Whatever of its session is left is killed."""
        try:
            return self.process.wait(timeout=timeout_s)
        finally:
            self.ended = time.monotonic()
            self.kill()

    def kill(self) -> None:
        """SIGKILL the run's whole process group (the driver, its Ray cluster and every actor: a lost node)."""
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=60)

    def actors(self, title: str) -> list[psutil.Process]:
        """The run's processes titled `ray::<title>` (an actor, `ray::<title>.<method>` while it runs one)."""
        return [
            process
            for process in session_processes(self.process.pid)
            if (process.info["cmdline"] or [""])[0].split(".")[0] == f"ray::{title}"
        ]

    def kill_actor(self, title: str, method: str, timeout_s: float = 300) -> str:
        """SIGKILL a `ray::<title>` process the moment it starts running `method` (its title read from /proc
        every few milliseconds: well inside a call). Returns its title when killed."""
        deadline, busy = time.monotonic() + timeout_s, f"ray::{title}.{method}"
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the run ended before a {title} ran {method}"
            pids = [actor.pid for actor in self.actors(title)]
            until = time.monotonic() + 1.0  # then look for actors again (one may have been replaced)
            while pids and time.monotonic() < until:
                for pid in pids:
                    try:
                        doing = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
                    except OSError:
                        continue
                    if doing == busy:
                        os.kill(pid, signal.SIGKILL)
                        return doing
                time.sleep(0.002)
            time.sleep(0.05)
        raise AssertionError(f"no {title} ran {method} within {timeout_s:g} s")


def session_processes(sid: int) -> list[psutil.Process]:
    """The live processes of session `sid` (a process started with start_new_session: its pid), with their
    command lines in `info["cmdline"]`."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getsid(process.pid) == sid:
                found.append(process)
        except (psutil.Error, OSError):  # gone meanwhile
            continue
    return found


@dataclass
class RunOutcome:
    """What a finished run left: its metrics rows, the last checkpoint's driver state, the exported weights."""

    metrics: list[dict]
    driver_state: dict
    weights: dict[str, torch.Tensor]

    @classmethod
    def read(cls, out: Path) -> RunOutcome:
        last = out / "checkpoints" / f"step_{STEPS:08d}"
        assert (last / "COMPLETE").is_file(), sorted(p.name for p in (out / "checkpoints").iterdir())
        return cls(
            metrics=[json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()],
            driver_state=json.loads((last / "driver_state.json").read_text()),
            weights=load_file(out / "policy_hf" / "model.safetensors"),
        )


def assert_same_run(outcome: RunOutcome, reference: RunOutcome) -> float:
    """Every step once, the same samples consumed, every metric but timings, fault counts and cache counters
    equal step for step (within METRIC_TOLERANCE), weights within WEIGHT_TOLERANCE. Returns the largest weight
    difference."""
    assert [m["step"] for m in outcome.metrics] == list(range(1, STEPS + 1))
    ignored = (*TIMINGS, *FAULT_COUNTS, *CACHE)
    differ = {
        f"step {m['step']} {key}": (m[key], r.get(key))
        for m, r in zip(outcome.metrics, reference.metrics, strict=True)
        for key in m
        if not key.startswith(ignored) and not same_metric(m[key], r.get(key))
    }
    assert not differ, differ
    state, expected = dict(outcome.driver_state), dict(reference.driver_state)
    state.pop("faults"), expected.pop("faults")
    assert state == expected  # the same samples consumed and skipped, counters, group ids, weight version
    assert outcome.weights.keys() == reference.weights.keys()
    gap = max(
        (outcome.weights[k].float() - reference.weights[k].float()).abs().max().item()
        for k in outcome.weights
    )
    assert gap <= WEIGHT_TOLERANCE, f"weights differ by up to {gap:.3g}"
    return gap


def same_metric(value: float, expected: float | None) -> bool:
    return expected is not None and math.isclose(value, expected, rel_tol=METRIC_TOLERANCE, abs_tol=1e-12)


def fault_totals(outcome: RunOutcome) -> dict[str, float]:
    """The run's fault counts as its last step logged them."""
    return {key: outcome.metrics[-1].get(key, 0.0) for key in FAULT_COUNTS}
