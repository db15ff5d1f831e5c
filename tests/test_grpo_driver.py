"""The GRPO driver in disaggregated placement on 2 logical GPUs, killed mid-run and resumed.

`veason grpo` runs as its own process (its own local Ray cluster); the test kills the whole process group
(driver, Ray and every actor: a lost node) once checkpoint 2 is complete, then starts the same command again.
The second run must resume from the latest complete checkpoint and finish the remaining steps. (The colocated
placement runs end to end in tests/test_demo.py, the README's first command.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def grpo_command(out: Path, data: Path, models) -> list[str]:
    policy, sam2 = models
    return [
        sys.executable, "-m", "pipelines.cli", "grpo", "configs/demo.yaml",
        f"run.output_dir={out}", f"data.root={data}", "data.num_frames=2", "data.decode_concurrency=1",
        f"model.policy={policy}", f"reward.sam2.checkpoint={sam2}",
        "placement.mode=disaggregated", "placement.num_gpus=2",
        "rollout.gpus_per_engine=1", "learner.gpus_per_worker=0.75", "reward.gpus_per_actor=0.25",
        "rollout.n=2", "rollout.sampling.max_new_tokens=16",
        f"trainer.steps={STEPS}", "trainer.save_every=1", "trainer.prompts_per_step=2",
        "trainer.sample_images_every=0",
    ]  # fmt: skip


def test_disaggregated_run_killed_after_a_checkpoint_resumes_and_finishes(
    tmp_path, synthetic_revos, tiny_models
):
    out = tmp_path / "run"
    command = grpo_command(out, synthetic_revos, tiny_models)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TQDM_DISABLE": "1"}
    env.pop("RAY_ADDRESS", None)
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
