"""The GRPO driver over a long run keeps every process's memory flat: `benchmarks/grpo_memory.py` on the tests'
embedded default (tests/configs/small.yaml: colocated on local Ray, the tiny random policy, one rollout
engine, one reward actor, one learner worker) for `STEPS` small steps (2 prompts x 2 responses, 2 frames, 16
new tokens, a checkpoint every 10 steps, sample images every 5), with every process's memory sampled at each
step. Non-timing properties only.

The bounds, from the measurements: from step `WARMUP` to the step before the last, the median USS (less Ray's
object store pages) of the last quarter of the samples exceeds that of the first quarter by at most
`GROWTH_BOUND_MIB` for the driver, the rollout engine, the reward actor and the learner worker (medians: a
sample may catch a generate or a weight push in flight). Measured on 2 busy cores (4 runs, steps 20-49 or
20-59): driver -5 to +3, reward +1, learner -64 to +36 (its USS swings by ~100 MiB between an update and the
next), engine -6 to +47 MiB (it jumps by 40-70 MiB for a sample and crept ~0.5 MiB a step over 120 demo
steps), hence their looser bounds. A batch's frames are 2 x 2 x 560 x 560 x 3 bytes = 3.6 MiB: a process that
kept each batch would grow by ~108 MiB between the quarters' middles (30 steps apart), past every bound.
"""

from __future__ import annotations

import pytest
from benchmark_runs import run_benchmark

pytestmark = pytest.mark.slow

STEPS, WARMUP = 60, 20
# MiB of USS (less Ray's object store pages) between the medians of the first and last quarter of the samples
GROWTH_BOUND_MIB = {
    "driver": 40.0,
    "ray::RolloutEngine": 80.0,
    "ray::SAM2RewardWorker": 40.0,
    "ray::LearnerWorker": 80.0,
}


def test_a_long_grpo_run_keeps_every_process_memory_flat(tmp_path, synthetic_revos, tiny_models):
    policy, sam2 = tiny_models
    args = [
        "--config", "tests/configs/small.yaml", "--steps", str(STEPS), "--warmup-steps", str(WARMUP),
        f"data.root={synthetic_revos}", "data.num_frames=2", "data.decode_concurrency=1",
        f"model.policy={policy}", f"reward.sam2.checkpoint={sam2}", "rollout.n=2",
        "rollout.sampling.max_new_tokens=16", "trainer.prompts_per_step=2", "trainer.save_every=10",
        "trainer.sample_images_every=5",
    ]  # fmt: skip
    figures = run_benchmark("benchmarks/grpo_memory.py", args, tmp_path, timeout_s=600)
    assert figures["steps"] == STEPS and figures["last"]["weights/version"] == STEPS
    processes = {p["name"]: p for p in figures["processes"]}
    for role, bound in GROWTH_BOUND_MIB.items():
        assert role in processes, list(processes)
        growth = processes[role]["own_last_quarter"] - processes[role]["own_first_quarter"]
        assert growth <= bound, (role, growth, figures["table"])
