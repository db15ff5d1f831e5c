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

The engine's creep was oneDNN's primitive cache (docs/reliability.md, "Load and memory"); since it is off, the
engine's quarters measured -55 MiB (its glibc heap grows and shrinks by 30-60 MiB at a time), too coarse to see
that creep here. `test_the_rollout_engine_keeps_no_kernels_for_each_new_prompt_length` bounds it where it is
exact: glibc's heap in use in an engine process over prompts of new lengths.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest
from benchmark_runs import CPU_ENV, REPO, run_benchmark

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


# MiB of glibc heap in use that 30 prompts of new lengths may leave behind in a rollout engine
NEW_SHAPES_GROWTH_BOUND_MIB = 5.0


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"
        )
    ]  # fmt: skip


def heap_in_use_mib() -> float:
    """glibc's heap in use in this process (mallinfo2's uordblks), MiB: what native code keeps allocated."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2().uordblks / 2**20


def engine_heap_growth(policy: str) -> float:
    """In this process: a rollout engine answers text prompts of 40 lengths (its GEMM handlers then hold primitives
    for 32 row counts each), then of 30 lengths not seen before; the heap in use gained over those 30, MiB."""
    from vllm import SamplingParams

    from actors.rollout import RolloutEngine
    from veason_ray.config_loading import load_config

    cfg = load_config(str(REPO / "tests/configs/small.yaml"), [f"model.policy={policy}"])
    engine = RolloutEngine(policy, cfg.rollout, dtype="float32")

    def ask(words: int) -> None:  # under vLLM's 128-token prefix-cache block: every prompt is prefilled whole
        text = " ".join(f"w{(words * 7 + j) % 97}" for j in range(words))
        engine.llm.generate([{"prompt": text}], SamplingParams(max_tokens=1), use_tqdm=False)

    for words in range(10, 90, 2):
        ask(words)
    before = heap_in_use_mib()
    for words in range(11, 71, 2):
        ask(words)
    return heap_in_use_mib() - before


def test_the_rollout_engine_keeps_no_kernels_for_each_new_prompt_length(tiny_models):
    """oneDNN's primitive cache kept ~0.28 MiB of JIT kernels for every new matmul shape (up to 1,024), and each
    new prompt length is one: the GRPO engine grew ~1 MiB a step. The engine turns that cache off itself
    (`CPU_VLLM_ENV`), so it is measured here in a fresh process whose caller did not set it. Measured: +0.04 MiB
    over 30 new lengths; +28.6 MiB with ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024 (oneDNN's default)."""
    policy, _ = tiny_models
    env = {**os.environ, **CPU_ENV, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    env.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    probe = f"from test_grpo_memory import engine_heap_growth; print(engine_heap_growth({str(policy)!r}))"
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    growth = json.loads(done.stdout.strip().splitlines()[-1])
    assert growth <= NEW_SHAPES_GROWTH_BOUND_MIB, growth
