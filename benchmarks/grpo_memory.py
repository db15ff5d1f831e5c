"""The GRPO driver over a long run on the embedded default (`configs/demo.yaml`, what `veason demo` trains: local
Ray on this machine's CPUs, the synthetic world, the tiny policy after CoT-SFT), with the memory of every
process sampled at each step: the driver (this process), the rollout engine actors (vLLM in process on CPU),
the reward actors, the learner workers, Ray Data's decoders and Ray's own processes
(benchmarks/process_memory.py).

The run is `GRPODriver.fit` as `veason grpo` runs it (metrics, wandb offline, sample images, checkpoints every
`trainer.save_every`, the HF export at the end), for `--steps` steps into a scratch folder; a thread samples
every process's RSS and USS each time the driver's step advances. Printed: per process, USS after
`--warmup-steps` steps, at the step before the last (the last step's sample races the final checkpoint and
the export) and its peak between them, RSS at that step, and the growth in MiB per 100 steps (the
least-squares slope over those steps), beside what one batch's frames weigh (a process that kept each batch
would grow by that much a step).

The policy is the demo's SFT policy (`runs/demo/sft/hf`, written by `make demo`) when it exists, else the
config's `model.policy` (the random-init tiny policy, whose answers run to `rollout.sampling.max_new_tokens`);
the synthetic world and the tiny models are written first where missing, as `veason demo` does.

    python benchmarks/grpo_memory.py --steps 120                         # about 15 minutes on 2 cores
    python benchmarks/grpo_memory.py --steps 40 --config tests/configs/small.yaml data.root=DIR ...
    python benchmarks/grpo_memory.py --steps 120 --out runs/grpo_memory.json   # the figures as JSON

Environment on CPU: RAY_AUTH_MODE=disabled OMP_NUM_THREADS=1 VLLM_CPU_OMP_THREADS_BIND=nobind
VLLM_CPU_KVCACHE_SPACE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 HF_HUB_OFFLINE=1 WANDB_MODE=offline
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `benchmarks.*` when run as a script
for _key, _value in {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}.items():
    os.environ.setdefault(_key, _value)

from benchmarks.process_memory import ProcessMemory, memory_table  # noqa: E402
from pipelines.console import open_console, say  # noqa: E402
from veason_ray.config import VeasonConfig  # noqa: E402
from veason_ray.config_loading import load_config  # noqa: E402
from veason_ray.frames import FRAME_SIZE  # noqa: E402

DEMO_CONFIG = "configs/demo.yaml"
DEMO_SFT_POLICY = REPO / "runs" / "demo" / "sft" / "hf"
MIB = 2**20
POLL_S = 0.2  # how often the sampling thread looks at the driver's step


def build_config(args: argparse.Namespace, run_dir: Path) -> VeasonConfig:
    overrides = [
        f"run.output_dir={run_dir}",
        f"trainer.steps={args.steps}",
        "trainer.resume=false",
        f"trainer.log_every={args.log_every}",
    ]
    if args.config == DEMO_CONFIG and DEMO_SFT_POLICY.is_dir():
        overrides.append(f"model.policy={DEMO_SFT_POLICY}")  # where `veason demo` starts GRPO
    return load_config(str(REPO / args.config), overrides + list(args.overrides))


class StepSampler:
    """Samples `memory` once when started (step 0) and each time `driver.state.step` advances, on a thread."""

    def __init__(self, memory: ProcessMemory, driver) -> None:
        self.memory, self.driver = memory, driver
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="step-memory", daemon=True)

    def __enter__(self) -> StepSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        seen = -1
        while not self._stop.is_set():
            step = self.driver.state.step
            if step != seen:
                self.memory.sample(step)
                seen = step
            self._stop.wait(POLL_S)


def run(cfg: VeasonConfig, warmup_steps: int) -> dict:
    """`fit` for `cfg.trainer.steps` steps with every process sampled at each step; the figures."""
    from pipelines.grpo import GRPODriver, run_outputs

    memory = ProcessMemory(os.getpid(), root_label="driver")
    start = time.perf_counter()
    driver = GRPODriver(cfg, run_outputs(cfg))
    try:
        say(f"driver ready in {driver.startup_seconds:.0f} s ({driver.placement.description})")
        with StepSampler(memory, driver):
            fitted_at = time.perf_counter()
            result = driver.fit()
            fit_s = time.perf_counter() - fitted_at
    finally:
        driver.shutdown()
    # up to the step before the last: the last step's sample races the final checkpoint and the HF export
    rows = memory.summaries(warmup_steps, until=result["steps"] - 1)
    batch_mib = cfg.trainer.prompts_per_step * cfg.data.num_frames * FRAME_SIZE * FRAME_SIZE * 3 / MIB
    return {
        "steps": result["steps"],
        "warmup_steps": warmup_steps,
        "startup_s": driver.startup_seconds,
        "fit_s": fit_s,
        "total_s": time.perf_counter() - start,
        "batch_frames_mib": batch_mib,
        "last": result["last"],
        "processes": [asdict(row) for row in rows],
        "series": [asdict(series) for series in memory.series.values()],
        "table": memory_table(rows, per=100, unit="steps"),
    }


def report(cfg: VeasonConfig, figures: dict) -> str:
    largest = max(figures["processes"], key=lambda r: r["uss_slope"])
    last = figures["last"]
    return "\n".join(
        [
            f"\nGRPO memory per process: policy {cfg.model.policy}, {cfg.placement.mode} placement, "
            f"{cfg.trainer.prompts_per_step} prompts x {cfg.rollout.n} responses, {cfg.data.num_frames} frames, "
            f"up to {cfg.rollout.sampling.max_new_tokens} new tokens, checkpoint every {cfg.trainer.save_every}, "
            f"sample images every {cfg.trainer.sample_images_every}",
            f"{figures['steps']} steps in {figures['fit_s']:.0f} s ({figures['fit_s'] / figures['steps']:.1f} s a "
            f"step; driver start {figures['startup_s']:.0f} s); memory from step {figures['warmup_steps']} to "
            f"step {figures['steps'] - 1} (the last step's sample races the final checkpoint and export)",
            "",
            figures["table"],
            "",
            f"largest USS growth: {largest['name']} {largest['uss_slope'] * 100:+.1f} MiB per 100 steps; one "
            f"batch's frames are {figures['batch_frames_mib']:.1f} MiB ({cfg.trainer.prompts_per_step} x "
            f"{cfg.data.num_frames} frames of {FRAME_SIZE}x{FRAME_SIZE}x3), "
            f"{figures['batch_frames_mib'] * 100:,.0f} MiB per 100 steps if a step kept its batch",
            f"last step: reward {last.get('reward/total', float('nan')):.3f}, weights version "
            f"{last.get('weights/version', float('nan')):.0f}",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, applied last")
    parser.add_argument("--config", default=DEMO_CONFIG, help="relative to the repository")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument(
        "--warmup-steps", type=int, default=None, help="memory counts from this step (default: steps / 5)"
    )
    parser.add_argument("--log-every", type=int, default=10, help="a step line every this many steps")
    parser.add_argument("--keep", action="store_true", help="keep the run folder (checkpoints, metrics)")
    parser.add_argument("--out", default="", help="write the figures as JSON here")
    args = parser.parse_args()
    warmup = args.steps // 5 if args.warmup_steps is None else args.warmup_steps
    if not 0 <= warmup < args.steps - 2:
        parser.error("--warmup-steps must leave at least two steps to measure")
    os.chdir(REPO)  # the configs' relative paths (runs/demo/...)
    work = Path(tempfile.mkdtemp(prefix="grpo_memory_"))
    cfg = build_config(args, work / "run")
    open_console(cfg, "grpo-memory")
    from pipelines.demo import ensure_dataset, ensure_tiny_models

    for note in (ensure_dataset(cfg), *ensure_tiny_models(cfg)):
        say(note)
    say(f"GRPO for {args.steps} steps into {work / 'run'}, memory sampled at each step")
    try:
        figures = run(cfg, warmup)
        say(report(cfg, figures))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"args": vars(args), **figures}, indent=2, default=str))
            say(f"wrote {args.out}")
    finally:
        import ray

        ray.shutdown()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
