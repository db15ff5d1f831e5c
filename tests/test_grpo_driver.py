"""The GRPO driver in disaggregated placement on 2 logical GPUs: killed mid-run and resumed; one step
off-policy (`trainer.max_staleness=1`) across an epoch boundary and a resume.

`veason grpo` runs as its own process (its own local Ray cluster); the first test kills the whole process group
(driver, Ray and every actor: a lost node) once checkpoint 2 is complete, then starts the same command again.
The second run must resume from the latest complete checkpoint and finish the remaining steps. (The colocated
placement runs end to end in tests/test_demo.py, the README's first command.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.grpo import check_trainer_config
from veason_ray.config_loading import ConfigError, load_config
from veason_ray.datasets import open_dataset, select_expressions
from veason_ray.sample_building import sample_key

REPO = Path(__file__).resolve().parents[1]
STEPS = 4


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from veason_ray.models.tiny_qwen import write_tiny_qwen
    from veason_ray.models.tiny_sam2 import write_tiny_sam2

    root = tmp_path_factory.mktemp("models")
    return write_tiny_qwen(root / "qwen2_5_vl_tiny", seed=0), write_tiny_sam2(
        root / "sam2_tiny", image_size=256
    )


def grpo_command(out: Path, data: Path, models, *extra: str) -> list[str]:
    policy, sam2 = models
    return [
        sys.executable, "-m", "pipelines.cli", "grpo", "tests/configs/small.yaml",
        f"run.output_dir={out}", f"data.root={data}", "data.num_frames=2", "data.decode_concurrency=1",
        f"model.policy={policy}", f"reward.sam2.checkpoint={sam2}",
        "placement.mode=disaggregated", "placement.num_gpus=2",
        "rollout.gpus_per_engine=1", "learner.gpus_per_worker=0.75", "reward.gpus_per_actor=0.25",
        "rollout.n=2", "rollout.sampling.max_new_tokens=16",
        f"trainer.steps={STEPS}", "trainer.save_every=1", "trainer.prompts_per_step=2",
        "trainer.sample_images_every=0", *extra,
    ]  # fmt: skip


def grpo_env() -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TQDM_DISABLE": "1"}
    env.pop("RAY_ADDRESS", None)
    return env


def test_disaggregated_run_killed_after_a_checkpoint_resumes_and_finishes(
    tmp_path, synthetic_revos, tiny_models
):
    out = tmp_path / "run"
    command = grpo_command(out, synthetic_revos, tiny_models)
    env = grpo_env()
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    marker = out / "checkpoints" / "step_00000002" / "COMPLETE"
    deadline = time.monotonic() + 600
    while not marker.exists():
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint 2 within 10 minutes"
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and its Ray cluster, at once
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"GRPO finished at step {STEPS} (resumed from" in second.stdout
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))  # no step lost, none twice
    # the resumed run's engines got the checkpoint's weights before generating (version 1 = that push)
    resumed = [m for m in steps if m["weights/version"] < m["step"]]
    assert resumed and all(0 <= m["reward/total"] <= 5 for m in steps)
    assert (out / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE").is_file()
    driver_state = json.loads((out / "checkpoints" / f"step_{STEPS:08d}" / "driver_state.json").read_text())
    assert driver_state["step"] == STEPS and len(driver_state["consumed"]) + driver_state["epoch"] > 0
    assert (out / "policy_hf" / "config.json").is_file()


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
    env = grpo_env()
    for steps in (3, 5):
        command = grpo_command(out, synthetic_revos, tiny_models, *off_policy)
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
