"""Faults the run survives without stopping: a reward actor or a rollout engine actor SIGKILLed while it works,
and a rollout engine that hangs (`rollout.inject_hang_s`: its first generate blocks until the pool aborts it at
`rollout.request_timeout_s`). The run completes with the same steps, samples, metrics (but timings and fault
counts) and weights as an uninterrupted run, the fault counted in `rollout/` or `reward/` restarts."""

from __future__ import annotations

import pytest
from grpo_runs import FaultRun, RunOutcome, assert_same_run, fault_totals, grpo_command

pytestmark = pytest.mark.slow


def completed(out, run: FaultRun, reference_run, fault: str) -> dict[str, float]:
    assert run.finish() == 0, run.output[-3000:]
    outcome = RunOutcome.read(out)
    gap = assert_same_run(outcome, reference_run)
    slowest = max(m["time/step_s"] for m in outcome.metrics)
    usual = max(m["time/step_s"] for m in reference_run.metrics)
    print(
        f"FAULT {fault}: run completed; slowest step {slowest:.1f} s (uninterrupted: {usual:.1f} s); "
        f"weights within {gap:.2g}; {fault_totals(outcome)}"
    )
    return fault_totals(outcome)


@pytest.mark.parametrize(
    "title, method, counter",
    [("SAM2RewardWorker", "score", "reward/restarts"), ("RolloutEngine", "generate", "rollout/restarts")],
)
def test_an_actor_killed_mid_call_is_replaced_and_the_run_ends_as_if_not(
    title, method, counter, tmp_path, synthetic_revos, tiny_models, reference_run
):
    out = tmp_path / "run"
    run = FaultRun(grpo_command(out, synthetic_revos, tiny_models), tmp_path / "run.log").start()
    run.wait_for("step 1", (out / "checkpoints" / "step_00000001" / "COMPLETE").exists)
    assert run.kill_actor(title, method) == f"ray::{title}.{method}"
    totals = completed(out, run, reference_run, f"{title} killed in {method}")
    assert totals[counter] >= 1


def test_a_hung_engine_is_aborted_restarted_and_the_run_ends_as_if_not(
    tmp_path, synthetic_revos, tiny_models, reference_run
):
    out = tmp_path / "run"
    hang = ("rollout.inject_hang_s=3600", "rollout.request_timeout_s=30")
    run = FaultRun(grpo_command(out, synthetic_revos, tiny_models, *hang), tmp_path / "run.log").start()
    totals = completed(out, run, reference_run, "rollout engine hung")
    assert totals["rollout/timeouts"] == 1 and totals["rollout/restarts"] >= 1
