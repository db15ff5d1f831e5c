"""The GRPO driver's settings and one step off-policy (`trainer.max_staleness=1`) across an epoch boundary and a
resume. A run killed and resumed, and every other fault, is in tests/faults/."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from grpo_runs import STEPS, grpo_command, grpo_env

from pipelines.grpo import check_trainer_config
from veason_ray.config_loading import ConfigError, load_config
from veason_ray.datasets import open_dataset, select_expressions
from veason_ray.sample_building import sample_key

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.max_staleness=2"], r"trainer.max_staleness=2: must be in \[0, 1\]"),
        (["trainer.max_staleness=1", "learner.old_logprobs=engine"], "needs placement.mode=disaggregated"),
        (
            ["trainer.max_staleness=1", "placement.mode=disaggregated"],
            "needs learner.old_logprobs=engine .* set learner.old_logprobs=engine",
        ),
    ],
)
def test_staleness_settings_the_driver_cannot_run_are_refused_with_the_fields_to_change(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_trainer_config(load_config(REPO / "tests" / "configs" / "small.yaml", overrides))
    ok = ["trainer.max_staleness=1", "placement.mode=disaggregated", "learner.old_logprobs=engine"]
    check_trainer_config(load_config(REPO / "tests" / "configs" / "small.yaml", ok))


@pytest.mark.slow  # ~105 s: an off-policy run across an epoch boundary and a resume (make test-slow)
def test_one_step_off_policy_bounds_staleness_and_trains_on_every_sample_once(
    tmp_path, synthetic_revos, tiny_models
):
    """5 expressions at 2 prompts a step: batches of 2, 2, 1 per epoch. Run 1 stops after step 3; its last
    checkpoint is deleted, as if it had died after checkpoint 2 with batch 3 generated ahead and not trained.
    Run 2 resumes there, trains batch 3 again (the rest of epoch 0) with epoch 1's first batch generated ahead,
    and goes on to step 5."""
    out = tmp_path / "run"
    off_policy = ("trainer.max_staleness=1", "learner.old_logprobs=engine", "data.max_expressions=5")
    keep_all = "trainer.keep_checkpoints=0"  # every checkpoint's driver state is read below
    env = grpo_env()
    for steps in (3, 5):
        command = grpo_command(out, synthetic_revos, tiny_models, *off_policy, keep_all)
        command[command.index(f"trainer.steps={STEPS}")] = f"trainer.steps={steps}"
        run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        if steps == 3:
            assert (out / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
            shutil.rmtree(out / "checkpoints" / "step_00000003")
    assert "resumed from" in run.stdout and "step_00000002" in run.stdout

    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5]
    # run 1: step 1 on-policy, step 2 generated during step 1; run 2 starts on-policy again at step 3
    assert [m["weights/staleness_max"] for m in steps] == [0, 1, 0, 1, 1]
    assert [m["rollout/generated_ahead"] for m in steps] == [0, 1, 0, 1, 1]
    assert all(m["weights/staleness_mean"] <= m["weights/staleness_max"] for m in steps)
    assert [m["data/epoch"] for m in steps] == [0, 0, 0, 1, 1]
    # samples drawn, the batch ahead included: run 2 draws batch 3 again, counting on from checkpoint 2's 4
    assert [(m["weights/version"], m["data/samples"]) for m in steps] == [
        (1, 4),
        (2, 5),
        (3, 7),
        (4, 9),
        (5, 9),
    ]

    def state(step: int) -> dict:
        return json.loads((out / "checkpoints" / f"step_{step:08d}" / "driver_state.json").read_text())

    cfg = load_config(REPO / "tests" / "configs" / "small.yaml", ["data.max_expressions=5"])
    records = open_dataset("revos", str(synthetic_revos), "train").expressions()
    epoch_keys = sorted(
        sample_key(r) for r in select_expressions(list(records), cfg.data.expression_types, 5, 0)
    )
    assert len(epoch_keys) == 5
    consumed = {step: state(step)["consumed"] for step in (1, 2, 3, 4, 5)}
    assert [len(consumed[s]) for s in (1, 2, 3, 4, 5)] == [2, 4, 5, 2, 4]  # batch 3 once, after the resume
    assert [state(s)["epoch"] for s in (1, 2, 3, 4, 5)] == [0, 0, 0, 1, 1]
    assert sorted(consumed[3]) == epoch_keys  # every sample of epoch 0 exactly once
    assert consumed[2] == consumed[3][:4] and consumed[4] == consumed[5][:2]
    assert len(set(consumed[5])) == 4 and set(consumed[5]) <= set(epoch_keys)
