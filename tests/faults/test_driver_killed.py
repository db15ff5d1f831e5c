"""The driver, its Ray cluster and every actor SIGKILLed at once (a lost node, a preempted head) once checkpoint
2 is complete; the same command run again resumes from the latest complete checkpoint and finishes: the same
steps, the same batches, every counter continuing; (slow) the same metrics and weights as an uninterrupted run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from grpo_runs import REPO, STEPS, FaultRun, RunOutcome, assert_same_run, grpo_command

from pipelines.frame_stream import FrameStream
from veason_ray.config_loading import load_config
from veason_ray.sample_building import sample_key


def killed_and_resumed(out: Path, command: list[str]) -> tuple[int, float]:
    """Run `command`, kill its process group once checkpoint 2 is complete, run it again to the end; the step it
    resumed from and the seconds the second run took to get back to where the first was killed."""
    first = FaultRun(command, out.parent / "first.log").start()
    first.wait_for("checkpoint 2", (out / "checkpoints" / "step_00000002" / "COMPLETE").exists)
    first.kill()
    second = FaultRun(command, out.parent / "second.log").start()
    assert second.finish() == 0, second.output[-3000:]
    resumed = re.search(rf"GRPO finished at step {STEPS} \(resumed from \S*step_(\d+)\)", second.output)
    assert resumed, second.output[-3000:]
    return int(resumed.group(1)), second.started


@pytest.mark.slow  # ~150 s; the default suite keeps the driver's position in tests/test_resume_position.py
def test_a_killed_run_resumes_with_every_counter_and_the_same_batches(tmp_path, synthetic_revos, tiny_models):
    out = tmp_path / "run"
    resumed_at, _ = killed_and_resumed(out, grpo_command(out, synthetic_revos, tiny_models))
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 2 <= resumed_at < STEPS
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))  # no step lost, none twice
    assert all(0 <= m["reward/total"] <= 5 for m in steps)
    # the counters of an uninterrupted run, across the resume: one weight push and one batch of 2 a step (the
    # resumed engines got the checkpoint's weights under its version), no sample skipped
    assert [(m["weights/version"], m["data/samples"], m["data/skipped"]) for m in steps] == [
        (k, 2 * k, 0) for k in range(1, STEPS + 1)
    ]
    driver_state = json.loads((out / "checkpoints" / f"step_{STEPS:08d}" / "driver_state.json").read_text())
    assert driver_state["step"] == driver_state["weight_version"] == STEPS
    assert driver_state["stream"]["samples"] == driver_state["next_group_id"] == 2 * STEPS
    # the batches of an uninterrupted run: the epoch's seeded expression order, the resumed run's included
    cfg = load_config(REPO / "tests" / "configs" / "small.yaml", [f"data.root={synthetic_revos}"])
    order = [sample_key(r) for r in FrameStream(cfg).records]
    assert driver_state["epoch"] == 0 and driver_state["consumed"] == order[: 2 * STEPS]
    assert (out / "policy_hf" / "config.json").is_file()


@pytest.mark.slow
def test_a_killed_and_resumed_run_ends_where_an_uninterrupted_run_ends(
    tmp_path, synthetic_revos, tiny_models, reference_run
):
    out = tmp_path / "run"
    killed_and_resumed(out, grpo_command(out, synthetic_revos, tiny_models))
    gap = assert_same_run(RunOutcome.read(out), reference_run)
    print(f"FAULT driver killed: resumed; weights within {gap:.2g} of the uninterrupted run's")
