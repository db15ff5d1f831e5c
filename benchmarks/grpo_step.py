"""GRPO step benchmark: seconds per step by stage and tokens/s/GPU of the real GRPODriver on one GPU.

Default (GPU): `configs/qwen2.5vl-3b-1gpu.yaml` (colocated on one GPU: vLLM at 25% memory with sleep mode,
ZeRO-2 with the optimizer offloaded, 2 SAM2 reward actors), a random-init Qwen2.5-VL with the real 3B shapes
(`benchmarks/rollout.py`'s writer), a random-init SAM2.1 hiera-tiny at its own 1024 px, and the paper's batch:
16 prompts x 8 responses, 6 frames at 560x560 (`make_groups`: random pixels, ~2,500 prompt tokens), up to
1,024 new tokens, lr 1e-6, KL 5e-3 (k3, reference model), clip 0.2, entropy 1e-3. One untimed warm-up step of
`--warmup-prompts` prompts (one-off costs: DeepSpeed's CPU Adam build, allocators, first compiles), then
`--steps` timed steps of the full batch, each `GRPODriver.step`: rollout -> SAM2 reward pool (as engines
finish) -> engines sleep -> learner update (reference and policy log-probs, backward, AdamW) -> engines wake
around the weight push (CUDA IPC). The seconds are the driver's own metrics (`time/*`, as in metrics.jsonl).

tokens/s/GPU as EasyR1 defines it: (prompt + response tokens of every sequence) / step seconds / GPUs, against
EasyR1's published 1,800 tokens/s/GPU for Qwen2.5-VL-3B on an H100 (another workload) and this project's goal of
2x (3,600). The same work under verl's trainer on the same card: benchmarks/peer_grpo_step.py.

Random weights never emit EOS, so every response runs to `--max-new-tokens` (a trained policy stops at 100-400
tokens, unevenly). `--lengths realistic` gives them such a spread: no response stops before 100 tokens
(`rollout.sampling.min_new_tokens`), then each sampled token ends it with probability ~1/150 (sampling is
narrowed to at most 1,024 random text tokens of the policy's tokenizer, `rollout.sampling.allowed_token_ids`,
1 in ~150 of which are `rollout.sampling.stop_token_ids`; random weights sample near uniformly; vLLM's GPU model
runner takes at most 128 stop ids beside a minimum length and 1,024 allowed ids, so a bare 1/150 of the vocabulary
cannot stop, and vLLM 0.26 takes allowed ids below the tokenizer's length only), so
lengths are 100 + geometric (mean ~250, 90% under ~450, a few cut at `--max-new-tokens`). The table prints the
lengths the step really had. With it, the config's packed, bucketed micro-batches against
`learner.micro_batch_tokens=0` (padded) and `learner.attention_bucket_tokens=0` (exact lengths) is the comparison
of issue 27 item 2. Their answers never parse, so the reward pool scores the format part only and runs no SAM2 propagation:
its wait here is a lower bound. The table says both with the measured shares.

    python benchmarks/grpo_step.py --out $OUT/grpo_step.json      # GPU, 3B shapes, 1 warm-up + 2 timed steps
    python benchmarks/grpo_step.py --tiny                          # CPU check: tiny models, logical GPU
    python benchmarks/grpo_step.py learner.micro_batch_size=8      # trailing key=value: config overrides
    python benchmarks/grpo_step.py --lengths realistic learner.micro_batch_tokens=0   # padded, real lengths
    python benchmarks/grpo_step.py --startups 2     # start-up only: the driver started twice on the same models,
                                                    # the first with an empty vLLM compile cache, the second warm

Start-up: the engines, the learner reading its models into CPU memory beside them, then the learner on its GPU
beside the SAM2 reward pool (pipelines/grpo.py); the table splits it so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

for _key, _value in {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}.items():
    os.environ.setdefault(_key, _value)

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import ray  # noqa: E402

from benchmarks.rollout import (  # noqa: E402
    REALISTIC_MEAN_EXTRA_TOKENS,
    REALISTIC_MIN_TOKENS,
    WorkerLogs,
    make_groups,
    write_random_3b_in_child,
)
from pipelines.grpo import Batch, GRPODriver, run_outputs  # noqa: E402
from veason_ray.config import VLLM_MAX_ALLOWED_TOKEN_IDS, VeasonConfig  # noqa: E402
from veason_ray.config_loading import load_config, save_config  # noqa: E402
from veason_ray.records import PromptGroup  # noqa: E402

EASYR1_TOKENS_PER_S_PER_GPU = 1800.0  # EasyR1's published Qwen2.5-VL-3B GRPO throughput on H100
GOAL_TOKENS_PER_S_PER_GPU = 3600.0  # issue 8: >= 2x EasyR1
BASE_CONFIG = "configs/qwen2.5vl-3b-1gpu.yaml"
T0 = time.perf_counter()


def say(message: str) -> None:
    """A progress line with the seconds since the script started, flushed at once."""
    print(f"[{time.perf_counter() - T0:7.1f} s] {message}", flush=True)


class MemoryMonitor:
    """Peak memory used, sampled in a thread: on GPU 0 by all processes (vLLM, learner, SAM2), from nvidia-smi;
    on the node by all processes (RAM in use, psutil), where an offloading learner keeps its optimizer. The driver
    process itself never touches CUDA."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.name, self.total_mib, self.peak_mib = "", 0.0, 0.0
        self.host_total_gib, self.host_peak_gib = psutil.virtual_memory().total / 2**30, 0.0
        self._stop = threading.Event()
        self.available = shutil.which("nvidia-smi") is not None and self._sample_gpu()
        threading.Thread(target=self._run, name="memory", daemon=True).start()

    def _sample_gpu(self) -> bool:
        try:
            out = subprocess.run(
                ["nvidia-smi", "-i", "0", "--query-gpu=name,memory.used,memory.total",
                 "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=10, check=True,
            ).stdout.strip()  # fmt: skip
            name, used, total = (part.strip() for part in out.split(","))
        except (OSError, subprocess.SubprocessError, ValueError):
            return False
        self.name, self.total_mib = name, float(total)
        self.peak_mib = max(self.peak_mib, float(used))
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.host_peak_gib = max(self.host_peak_gib, host_used_gib())
            if self.available:
                self._sample_gpu()

    def reset(self) -> None:
        self.peak_mib, self.host_peak_gib = 0.0, 0.0

    def device(self) -> str:
        """The GPU's peak, or "" where nvidia-smi did not answer."""
        return (
            f"{self.peak_mib / 1024:.1f} GiB of {self.total_mib / 1024:.0f} on the device"
            if self.available
            else ""
        )

    def host(self) -> str:
        return f"{self.host_peak_gib:.1f} GiB of {self.host_total_gib:.0f} in use on the node (all processes)"

    def stop(self) -> None:
        self._stop.set()


def host_used_gib() -> float:
    """RAM in use on the node: total minus available (page cache that can be dropped is not counted)."""
    memory = psutil.virtual_memory()
    return (memory.total - memory.available) / 2**30


def build_config(args: argparse.Namespace, policy: Path, sam2: Path, run_dir: Path) -> VeasonConfig:
    overrides = [
        f"model.policy={policy}",
        f"reward.sam2.checkpoint={sam2}",  # a folder: the checkpoint and its yaml
        "reward.sam2.config=",
        "reward.sam2.image_size=0",
        f"run.output_dir={run_dir}",
        "run.name=grpo-step-benchmark",
        f"data.num_frames={args.frames}",
        f"rollout.n={args.n}",
        f"rollout.sampling.max_new_tokens={args.max_new_tokens}",
        f"rollout.max_images_per_prompt={max(args.frames, 8)}",
        "learner.lr=1e-6",
        "learner.loss.kl_coef=5e-3",
        "learner.loss.clip_ratio=0.2",
        "learner.loss.entropy_coef=1e-3",
        f"trainer.prompts_per_step={args.prompts}",
        "trainer.resume=false",
        "trainer.save_every=0",
        "trainer.sample_images_every=0",
        "trainer.wandb.mode=disabled",
    ]
    if args.lengths == "realistic":
        overrides += realistic_length_overrides(args, policy)
    if args.tiny:  # the same colocated path on a CPU machine: one logical GPU, float32, no sleep mode
        overrides += [
            "placement.num_gpus=1",
            "placement.num_cpus=8",
            "model.dtype=float32",
            "learner.bf16=false",
            "learner.offload_optimizer=false",
            "learner.gradient_checkpointing=false",
            "rollout.enforce_eager=true",
            "rollout.max_model_len=2048",
            "rollout.suppress_vision_tokens=true",
            "reward.actors=1",
        ]
    return load_config(args.config, overrides + list(args.overrides))


def realistic_length_overrides(args: argparse.Namespace, policy: Path) -> list[str]:
    """`--lengths realistic`: a minimum length; sampling narrowed to (at most) 1,024 of the policy's text tokens,
    and 1 / mean-extra of those made stop ids (drawn with a fixed seed), so a near-uniform random policy stops
    after a geometric number of tokens. Within vLLM's per-request limits (`check_sampling`). With --tiny,
    scaled to its 16 new tokens."""
    from transformers import AutoConfig, AutoTokenizer

    minimum, extra = (4, 6) if args.tiny else (REALISTIC_MIN_TOKENS, REALISTIC_MEAN_EXTRA_TOKENS)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    # below both the tokenizer's length and the model's vocabulary (the random 3B carries the tiny tokenizer)
    vocab = min(len(tokenizer), AutoConfig.from_pretrained(policy).get_text_config().vocab_size)
    added = list(tokenizer.added_tokens_decoder)  # <|endoftext|>, <|im_start|>, the vision tokens, ...
    text_ids = np.setdiff1d(np.arange(min(1000, vocab // 4), vocab), added + tokenizer.all_special_ids)
    rng = np.random.default_rng(0)
    allowed = rng.choice(text_ids, size=min(len(text_ids), VLLM_MAX_ALLOWED_TOKEN_IDS), replace=False)
    stop = rng.choice(allowed, size=max(1, round(len(allowed) / extra)), replace=False)
    return [
        f"rollout.sampling.min_new_tokens={minimum}",
        f"rollout.sampling.allowed_token_ids=[{','.join(map(str, sorted(allowed.tolist())))}]",
        f"rollout.sampling.stop_token_ids=[{','.join(map(str, sorted(stop.tolist())))}]",
    ]


def write_models(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """The policy (random 3B shapes, or the tiny model) and a random SAM2.1 hiera-tiny folder, under `work`, or
    under `--models-dir`, where each is written only if missing and kept for the next run: vLLM's compile cache is
    keyed by the model's path, so a warm start needs the same folder."""
    from veason_ray.models.tiny_sam2 import write_tiny_sam2

    base = Path(args.models_dir) if args.models_dir else work
    policy = base / ("qwen2_5_vl_tiny" if args.tiny else "qwen2_5_vl_3b_random")
    sam2 = base / "sam2_hiera_t"
    if not (policy / "config.json").is_file():
        if args.tiny:
            from veason_ray.models.tiny_qwen import write_tiny_qwen

            write_tiny_qwen(policy, seed=0)
        else:
            write_random_3b_in_child(policy)
    if not sam2.is_dir():
        write_tiny_sam2(sam2, seed=0, image_size=256 if args.tiny else 1024)
    return policy, sam2


def step_groups(groups: list[PromptGroup], first: int, count: int) -> Batch:
    """Groups [first, first + count) with their frames put in Ray's object store once, as the driver's frame
    stream delivers them."""
    picked = [
        PromptGroup(g.group_id, dataclasses.replace(g.sample, frames=ray.put(g.sample.frames)))
        for g in groups[first : first + count]
    ]
    return Batch(epoch=0, groups=picked)


STAGES = (
    ("generate", "time/generate_s"),
    ("reward wait after generation", "time/reward_wait_s"),
    ("engines sleep", "time/sleep_s"),
    ("learner: encode, ref + policy log-probs, update", "time/update_s"),
    ("weight push (IPC / reload)", "time/sync_s"),
    ("engines wake (around the push)", "time/wake_s"),
    ("other (advantages, bookkeeping)", "time/other_s"),
    ("step", "time/step_s"),
)


def run_steps(
    driver: GRPODriver, args: argparse.Namespace, info: dict, monitor: MemoryMonitor | None
) -> list[dict[str, float]]:
    """The untimed warm-up step, then up to `args.steps` timed steps (the driver's metrics of each); a step
    that would end past `--budget-s` (judged by the last one) is skipped."""
    groups = make_groups(args.warmup_prompts + args.steps * args.prompts, args.frames, args.size)
    warmup = driver.step(step_groups(groups, 0, args.warmup_prompts))
    info["warmup_s"] = warmup["time/step_s"]
    say(f"warm-up step: {warmup['time/step_s']:.1f} s")
    driver.learner.device_memory()  # resets the learner's peak: the timed steps are the measured ones
    if monitor is not None:
        monitor.reset()
    steps: list[dict[str, float]] = []
    for index in range(args.steps):
        if steps and time.perf_counter() - T0 + steps[-1]["time/step_s"] > args.budget_s:
            say(f"skipping timed step {index + 1}: it would end past --budget-s {args.budget_s:.0f}")
            break
        metrics = driver.step(step_groups(groups, args.warmup_prompts + index * args.prompts, args.prompts))
        steps.append(metrics)
        parts = ", ".join(f"{key[5:-2]} {metrics[key]:.1f}" for _, key in STAGES[:-1])
        say(
            f"timed step {index + 1}: {metrics['time/step_s']:.1f} s ({parts}); "
            f"{metrics['throughput/tokens_per_s_per_gpu']:,.0f} tokens/s/GPU"
        )
    return steps


def peak_memory(driver: GRPODriver, monitor: MemoryMonitor | None) -> str:
    """Peak GPU memory over the timed steps: the whole device (every process), and the learner rank's torch."""
    parts = [monitor.device()] if monitor is not None and monitor.available else []
    learner = driver.learner.device_memory()[0]
    if learner:
        parts.append(f"learner rank {learner['peak_allocated_gib']:.1f} GiB allocated by torch")
    return "; ".join(parts) or "not measured (no GPU)"


def learner_parts(metrics: dict[str, float]) -> dict[str, float]:
    """The learner's seconds by part: the slowest rank's own clock for reference log-probs, optimizer step and
    the policy's forward + backward (the rest of its update); prompt encoding and Ray calls are the rest of
    the driver's `time/update_s`."""
    total = metrics["learner/update_seconds"]
    reference = metrics.get("learner/reference_seconds", 0.0)
    optimizer = metrics.get("learner/optimizer_seconds", 0.0)
    return {
        "  reference log-probs": reference,
        "  policy forward + backward": total - reference - optimizer,
        "  optimizer step": optimizer,
        "  prompt encoding, Ray calls": metrics["time/update_s"] - total,
    }


def summarise(steps: list[dict[str, float]], gpus: float) -> dict[str, float]:
    """The mean of the timed steps; tokens/s/GPU over their summed tokens and seconds."""
    mean = {key: sum(s[key] for s in steps) / len(steps) for _, key in STAGES}
    tokens = sum(s["response/prompt_tokens"] + s["response/tokens"] for s in steps)
    seconds = sum(s["time/step_s"] for s in steps)
    mean["tokens"] = tokens / len(steps)
    mean["tokens_per_s_per_gpu"] = tokens / seconds / max(gpus, 1)
    return mean


def print_table(args: argparse.Namespace, steps: list[dict[str, float]], info: dict) -> None:
    columns = [f"step {i + 1}" for i in range(len(steps))] + ["mean"]
    mean = summarise(steps, info["gpus"])
    print(
        f"\nGRPO step on {info['device']}: Qwen2.5-VL {'tiny' if args.tiny else '3B shapes'} (random init), "
        f"{args.prompts} prompts x {args.n} responses, {args.frames} frames at {args.size} px, up to "
        f"{args.max_new_tokens} new tokens, {info['gpus']:g} GPU(s), {info['placement']}"
    )
    print(
        f"setup: models written {info['write_s']:.0f} s, driver start {info['startup_s']:.0f} s (engines up at "
        f"{info['engines_up_s']:.0f} s; learner: models read {info['learner_load_s']:.0f} s beside them, then "
        f"{info['learner_device_s']:.0f} s on its GPU: process group {info['learner_process_group_s']:.0f} s, "
        f"DeepSpeed engine {info['learner_engine_s']:.0f} s, reference {info['learner_reference_s']:.0f} s), "
        "warm-up step "
        f"({args.warmup_prompts} prompts, untimed) {info['warmup_s']:.0f} s"
    )
    width = 50
    print(f"{'seconds per step':<{width}}" + "".join(f"{c:>10}" for c in columns))
    for label, key in STAGES:
        print(f"{label:<{width}}" + "".join(f"{s[key]:>10.2f}" for s in steps) + f"{mean[key]:>10.2f}")
        if key == "time/update_s" and all("learner/update_seconds" in s for s in steps):
            parts = [learner_parts(s) for s in steps]
            for part in parts[0]:
                values = [p[part] for p in parts]
                print(
                    f"{part:<{width}}"
                    + "".join(f"{v:>10.2f}" for v in values)
                    + f"{sum(values) / len(values):>10.2f}"
                )
    rows = [
        ("tokens (prompt + response, all sequences)", [s["response/prompt_tokens"] + s["response/tokens"] for s in steps], mean["tokens"], "{:>10,.0f}"),
        ("tokens/s/GPU (EasyR1's definition)", [s["throughput/tokens_per_s_per_gpu"] for s in steps], mean["tokens_per_s_per_gpu"], "{:>10,.0f}"),
        (f"  / EasyR1 {EASYR1_TOKENS_PER_S_PER_GPU:,.0f} tok/s/GPU (3B, H100)", [s["throughput/tokens_per_s_per_gpu"] / EASYR1_TOKENS_PER_S_PER_GPU for s in steps], mean["tokens_per_s_per_gpu"] / EASYR1_TOKENS_PER_S_PER_GPU, "{:>9.2f}x"),
        (f"  / goal {GOAL_TOKENS_PER_S_PER_GPU:,.0f} tok/s/GPU", [s["throughput/tokens_per_s_per_gpu"] / GOAL_TOKENS_PER_S_PER_GPU for s in steps], mean["tokens_per_s_per_gpu"] / GOAL_TOKENS_PER_S_PER_GPU, "{:>9.2f}x"),
    ]  # fmt: skip
    for label, values, total, fmt in rows:
        print(f"{label:<{width}}" + "".join(fmt.format(v) for v in values) + fmt.format(total))
    last = steps[-1]
    memory = info["memory"]
    print(
        f"peak GPU memory: {memory}\npeak host memory: {info.get('host_memory', 'not measured')}\n"
        f"responses ({args.lengths} lengths): mean length {last['response/length_mean']:.0f} tokens, longest "
        f"{last['response/length_max']:.0f}, {last['response/truncated']:.0%} cut at {args.max_new_tokens}\n"
        f"rewards: parse rate {last['reward/parse_rate']:.0%}, mean total {last['reward/total']:.3f} (answers of random "
        "weights do not parse: the reward pool scores the format part and runs no SAM2 propagation, so its wait "
        "is a lower bound)"
    )  # fmt: skip
    if len(steps) < args.steps:
        print(f"only {len(steps)} of {args.steps} timed steps fitted --budget-s {args.budget_s:.0f}")


STARTUP_PARTS = (
    ("driver start (placement to every pool ready)", "startup_s"),
    ("  engines up", "engines_up_s"),
    ("    of it: vLLM's own start in the engine", "vllm_start_s"),
    ("  learner: models read into CPU memory (beside the engines)", "learner_load_s"),
    ("  learner: on its GPU (beside the reward pool)", "learner_device_s"),
    ("    of it: process group", "learner_process_group_s"),
    ("    of it: DeepSpeed engine (policy to the GPU, optimizer states)", "learner_engine_s"),
    ("    of it: reference to the GPU", "learner_reference_s"),
)


ACTOR_ERROR_MARKERS = ("Error", "error:", "Traceback", "raise ")


def print_actor_errors(logs: WorkerLogs, limit: int = 40) -> None:
    """The error lines Ray's workers logged since `logs.mark()` (vLLM's engine core, DeepSpeed, SAM2), which
    the driver's exception only summarises (e.g. "vLLM raised EngineDeadError"); `--actor-logs` shows all."""
    lines = logs.lines_since_mark(ACTOR_ERROR_MARKERS)
    if lines:
        print(f"\nerror lines in the actors' logs ({len(lines)}, the last {min(limit, len(lines))}):")
        print("\n".join(lines[-limit:]), flush=True)


def measure_startups(args: argparse.Namespace, policy: Path, sam2: Path, work: Path) -> int:
    """`--startups N`: the driver started N times on the same model folders with one vLLM compile cache
    (`rollout.compile_cache_dir`, empty at the first start), each shut down once up; the split of each."""
    cache = work / "vllm_compile_cache"
    rows = []
    try:
        for index in range(args.startups):
            cfg = build_config(args, policy, sam2, work / f"run{index}")
            cfg.rollout.compile_cache_dir = str(cache)
            ray.init(
                num_cpus=cfg.placement.num_cpus or None,
                num_gpus=cfg.placement.num_gpus or None,
                include_dashboard=False,
                log_to_driver=args.actor_logs,
            )
            label = "cold" if index == 0 else "warm"
            say(f"start-up {index + 1} ({label} compile cache)")
            driver = GRPODriver(cfg, run_outputs(cfg))
            try:
                row = {"label": label, "startup_s": driver.startup_seconds, **driver.startup_split}
                row["vllm_start_s"] = max(i["start_seconds"] for i in driver.rollout.engine_info)
                rows.append(row)
                say(
                    f"start-up {index + 1}: "
                    + ", ".join(f"{k} {v:.1f}" for k, v in row.items() if k != "label")
                )
            finally:
                driver.shutdown()
                ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    width = 62
    print(f"\nDriver start-up, {'tiny' if args.tiny else 'Qwen2.5-VL 3B shapes'}, {args.config}")
    print(f"{'seconds':<{width}}" + "".join(f"{r['label']:>10}" for r in rows))
    for label, key in STARTUP_PARTS:
        print(f"{label:<{width}}" + "".join(f"{r[key]:>10.1f}" for r in rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "startups": rows}))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, applied last")
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU (a check of the script)")
    parser.add_argument("--config", default=BASE_CONFIG)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up step")
    parser.add_argument("--warmup-prompts", type=int, default=1, help="prompts of the untimed first step")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--size", type=int, default=560)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument(
        "--lengths",
        choices=("max", "realistic"),
        default="max",
        help="max: every response runs to --max-new-tokens (random weights); realistic: 100 + geometric",
    )
    parser.add_argument(
        "--budget-s", type=float, default=520, help="skip a timed step that would end past this many seconds"
    )
    parser.add_argument("--models-dir", default="", help="keep the written models here for the next run")
    parser.add_argument(
        "--startups",
        type=int,
        default=0,
        help="only measure this many driver start-ups (cold cache, then warm)",
    )
    parser.add_argument("--actor-logs", action="store_true", help="stream the actors' logs (vLLM, DeepSpeed)")
    parser.add_argument("--out", default="", help="write the per-step metrics and the summary as JSON here")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.tiny:
        args.prompts, args.n, args.frames, args.size, args.max_new_tokens = 2, 2, 2, 112, 16
        args.warmup_prompts = 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)

    work = Path(tempfile.mkdtemp(prefix="grpo_step_"))
    say(f"models under {args.models_dir or work} (written where missing)")
    policy, sam2 = write_models(args, work)
    write_s = time.perf_counter() - T0
    if args.startups:
        return measure_startups(args, policy, sam2, work)
    cfg = build_config(args, policy, sam2, work / "run")
    save_config(cfg, work / "run" / "config.yaml")
    monitor = MemoryMonitor() if not args.tiny else None
    context = ray.init(
        num_cpus=cfg.placement.num_cpus or None,
        num_gpus=cfg.placement.num_gpus or None,
        include_dashboard=False,
        log_to_driver=args.actor_logs,
    )
    logs = WorkerLogs(Path(context.address_info["session_dir"]) / "logs")
    logs.mark()
    driver = None
    try:
        say("starting the driver: placement, learner, rollout engine, SAM2 reward pool")
        driver = GRPODriver(cfg, run_outputs(cfg))
        say(f"driver ready in {driver.startup_seconds:.0f} s ({driver.placement.description})")
        info = {
            "device": monitor.name if monitor and monitor.available else "CPU (logical GPU)",
            "gpus": driver.gpus,
            "placement": driver.placement.description,
            "write_s": write_s,
            "startup_s": driver.startup_seconds,
            **driver.startup_split,
        }
        steps = run_steps(driver, args, info, monitor)
        info["memory"] = peak_memory(driver, monitor)
        info["host_memory"] = monitor.host() if monitor is not None else "not measured"
        print_table(args, steps, info)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            summary = summarise(steps, info["gpus"])
            Path(args.out).write_text(
                json.dumps({"args": vars(args), "info": info, "steps": steps, "mean": summary})
            )
    except Exception:
        print_actor_errors(logs)  # the actors' own lines: their exceptions reach here as summaries
        raise
    finally:
        if monitor is not None:
            monitor.stop()
        if driver is not None:
            driver.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)  # the models (7.5 GB for the 3B) and the run folder
    say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
