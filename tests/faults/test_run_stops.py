"""Faults that stop the run with an error naming the cause and the checkpoint to resume from: a learner worker
SIGKILLed during its update, the disk of the checkpoint folder full when a checkpoint is written. The same command
run again (the disk freed) resumes from the latest complete checkpoint and ends where an uninterrupted run ends:
the same steps, samples, metrics and weights."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from grpo_runs import STEPS, FaultRun, RunOutcome, assert_same_run, fault_totals, grpo_command

pytestmark = pytest.mark.slow


def resumed_to_the_end(out: Path, command: list[str], reference_run, fault: str, stopped: FaultRun) -> None:
    second = FaultRun(command, out.parent / "second.log").start()
    assert second.finish() == 0, second.output[-3000:]
    resumed = re.search(rf"GRPO finished at step {STEPS} \(resumed from \S*step_(\d+)\)", second.output)
    assert resumed, second.output[-3000:]
    gap = assert_same_run(RunOutcome.read(out), reference_run)
    print(
        f"FAULT {fault}: stopped after {stopped.ended - stopped.started:.1f} s; resumed from step "
        f"{int(resumed.group(1))}; weights within {gap:.2g}"
    )


def test_a_learner_worker_killed_stops_the_run_naming_it_and_the_same_command_resumes(
    tmp_path, synthetic_revos, tiny_models, reference_run
):
    """The first run also has a hung engine at its first step (restarted in place): the resumed run's fault
    counts continue from the checkpoint's."""
    out = tmp_path / "run"
    command = grpo_command(out, synthetic_revos, tiny_models)
    hang = ("rollout.inject_hang_s=3600", "rollout.request_timeout_s=30")
    first = FaultRun([*command, *hang], tmp_path / "first.log").start()
    first.wait_for("checkpoint 2", (out / "checkpoints" / "step_00000002" / "COMPLETE").exists)
    first.kill_actor("LearnerWorker", "update")
    assert first.finish() == 1
    console = first.output
    assert "LearnerWorker" in console, console[-3000:]
    assert f"the same command resumes from {out}/checkpoints/step_00000002" in console, console[-3000:]
    resumed_to_the_end(out, command, reference_run, "learner worker killed", first)
    counts = fault_totals(RunOutcome.read(out))  # the first run's, carried on by the second
    assert counts["rollout/timeouts"] == 1 and counts["rollout/restarts"] == 1, counts


@pytest.fixture
def checkpoint_disk(tmp_path):
    """`<tmp_path>/run/checkpoints` on a disk of its own (a tmpfs; root only), unmounted at the end."""
    mount = tmp_path / "run" / "checkpoints"
    mount.mkdir(parents=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Write a file on `disk` until it is full; the file."""
    filler = disk / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    return filler


def test_a_full_checkpoint_disk_stops_the_run_naming_it_and_the_same_command_resumes_once_freed(
    tmp_path, synthetic_revos, tiny_models, reference_run, checkpoint_disk
):
    out = checkpoint_disk.parent
    command = grpo_command(out, synthetic_revos, tiny_models)
    first = FaultRun(command, tmp_path / "first.log").start()
    first.wait_for("checkpoint 1", (out / "checkpoints" / "step_00000001" / "COMPLETE").exists)
    filler = fill(checkpoint_disk)
    assert first.finish() == 1
    console = first.output
    assert re.search(r"checkpoint of step \d could not be written to \S+step_0000000\d", console), console[
        -3000:
    ]
    assert "the disk is full" in console, console[-3000:]
    complete = sorted(p.parent.name for p in checkpoint_disk.glob("*/COMPLETE"))
    assert sorted(p.name for p in checkpoint_disk.glob("step_*")) == complete  # the partial one removed
    assert f"the same command resumes from {out}/checkpoints/{complete[-1]}" in console, console[-3000:]
    filler.unlink()
    resumed_to_the_end(out, command, reference_run, "checkpoint disk full", first)
