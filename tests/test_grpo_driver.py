"""The GRPO driver in disaggregated placement on 2 logical GPUs: killed mid-run and resumed (and, slow, beside
an uninterrupted run with the same seed: the same metrics); one step off-policy (`trainer.max_staleness=1`)
across an epoch boundary and a resume.

`veason grpo` runs as its own process (its own local Ray cluster); the first test kills the whole process group
(driver, Ray and every actor: a lost node) once checkpoint 2 is complete, then starts the same command again.
The second run must resume from the latest complete checkpoint and finish the remaining steps, logging the step,
weight version and data counts an uninterrupted run logs, on the batches it draws. (The colocated placement runs
end to end in tests/test_demo.py, the README's first command.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.frame_stream import FrameStream
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


def run_killed_and_resumed(out: Path, command: list[str]) -> tuple[int, list[dict]]:
    """Start `command` (its run.output_dir: `out`), kill its whole process group (driver, Ray and every actor: a
    lost node) once checkpoint 2 is complete, run it again to the end; returns the step it resumed from and the
    rows of metrics.jsonl."""
    env = grpo_env()
    log = (out.parent / "first.log").open("w")
    first = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    marker = out / "checkpoints" / "step_00000002" / "COMPLETE"
    deadline = time.monotonic() + 600
    while not marker.exists():
        assert first.poll() is None, (out.parent / "first.log").read_text()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint 2 within 10 minutes"
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and its Ray cluster, at once
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    resumed = re.search(rf"GRPO finished at step {STEPS} \(resumed from \S*step_(\d+)\)", second.stdout)
    assert resumed, second.stdout[-3000:]
    return int(resumed.group(1)), [
        json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
    ]


def test_disaggregated_run_killed_after_a_checkpoint_resumes_and_finishes(
    tmp_path, synthetic_revos, tiny_models
):
    out = tmp_path / "run"
    resumed_at, steps = run_killed_and_resumed(out, grpo_command(out, synthetic_revos, tiny_models))
    assert 2 <= resumed_at < STEPS
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))  # no step lost, none twice
    assert all(0 <= m["reward/total"] <= 5 for m in steps)
    # the counters of an uninterrupted run, across the resume: one weight push and one batch of 2 a step (the
    # resumed engines got the checkpoint's weights under its version), no sample skipped
    assert [(m["weights/version"], m["data/samples"], m["data/skipped"]) for m in steps] == [
        (k, 2 * k, 0) for k in range(1, STEPS + 1)
    ]
    assert (out / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE").is_file()
    driver_state = json.loads((out / "checkpoints" / f"step_{STEPS:08d}" / "driver_state.json").read_text())
    assert driver_state["step"] == driver_state["weight_version"] == STEPS
    assert driver_state["stream"]["samples"] == driver_state["next_group_id"] == 2 * STEPS
    # the batches of an uninterrupted run: the epoch's seeded expression order, the resumed run's included
    cfg = load_config(REPO / "tests" / "configs" / "small.yaml", [f"data.root={synthetic_revos}"])
    order = [sample_key(r) for r in FrameStream(cfg).records]
    assert driver_state["epoch"] == 0 and driver_state["consumed"] == order[: 2 * STEPS]
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


# metrics that measure time: the only ones a resumed run may log differently
TIMINGS = ("time/", "throughput/", "data/samples_per_s", "data/frames_per_s", "learner/update_seconds",
           "learner/reference_seconds", "learner/optimizer_seconds", "learner/tokens_per_second")  # fmt: skip


@pytest.mark.slow  # ~2 x the kill test above: an uninterrupted run beside a killed and resumed one (make test-slow)
def test_a_resumed_run_logs_what_an_uninterrupted_run_logs(tmp_path, synthetic_revos, tiny_models):
    """The same seed with per-request sampling seeds (run seed + group id): the resumed run samples the same
    responses on the same weights, so every metric but the timings is equal, step for step. (Without
    rollout.seed_requests the resumed engines' fresh generators sample other responses after the resume.)"""
    seeded = "rollout.seed_requests=true"
    whole = tmp_path / "whole"
    run = subprocess.run(
        grpo_command(whole, synthetic_revos, tiny_models, seeded),
        cwd=REPO, env=grpo_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    expected = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    out = tmp_path / "run"
    resumed_at, steps = run_killed_and_resumed(out, grpo_command(out, synthetic_revos, tiny_models, seeded))
    assert resumed_at < STEPS and [m["step"] for m in expected] == list(range(1, STEPS + 1))
    differ = {
        f"step {m['step']} {key}": (m[key], e.get(key))
        for m, e in zip(steps, expected, strict=True)
        for key in m
        if not key.startswith(TIMINGS) and m[key] != e.get(key)
    }
    assert not differ, differ
