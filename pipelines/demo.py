"""`veason demo`: the embedded default, end to end, on a local Ray cluster.

It writes the synthetic world and the tiny random-init models where the config points (when missing), evaluates
the policy on the held-out split (prompts, answers, reward parts, SAM2 propagation, J&F, overlays), runs a short
GRPO training (`pipelines/grpo.py`: rollout, reward and learner pools, checkpoints, the exported policy), and
evaluates the trained policy the same way. The random tiny policy does not learn the task in a few steps on
CPU: the demo shows the machinery and where every output lands, the learning curves come from GPU runs.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from pipelines import preflight
from pipelines.config_command import add_config_arguments, config_from_args
from pipelines.evaluate import format_report, run_evaluation
from pipelines.grpo import train
from pipelines.ray_runtime import init_ray
from veason_ray.config import VeasonConfig
from veason_ray.config_loading import save_config
from veason_ray.object_store import is_s3_uri


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, default="configs/demo.yaml")


def ensure_dataset(cfg: VeasonConfig) -> str:
    """Write the synthetic world at `data.root` when it is missing and `data.synth.enabled`."""
    from veason_ray.synth.writer import write_synthetic_dataset

    root = cfg.data.root
    if is_s3_uri(root) or Path(root).exists():
        return f"dataset: {root} (existing)"
    if not cfg.data.synth.enabled:
        raise SystemExit(
            f"data.root {root} does not exist; point data.root at a dataset or set data.synth.enabled=true"
        )
    synth = cfg.data.synth
    summary = write_synthetic_dataset(
        root,
        layout="reasonvos" if cfg.data.dataset == "reasonvos" else "revos",
        num_videos=synth.videos,
        num_frames=synth.frames,
        height=synth.height,
        width=synth.width,
        seed=synth.seed,
        valid_fraction=synth.valid_fraction,
        min_objects=synth.min_objects,
        max_objects=synth.max_objects,
    )
    return f"dataset: {root} (synthetic, written now: {summary.num_videos} videos)"


def ensure_tiny_models(cfg: VeasonConfig) -> list[str]:
    """Write the tiny policy / SAM2 where the config names a missing folder of the tiny models' names."""
    from veason_ray.models.tiny_qwen import TINY_QWEN_DIRNAME, write_tiny_qwen
    from veason_ray.models.tiny_sam2 import SAM2_TINY_DIRNAME, write_tiny_sam2

    notes = []
    policy = Path(cfg.model.policy)
    if policy.name == TINY_QWEN_DIRNAME and not policy.exists():
        write_tiny_qwen(policy, seed=cfg.run.seed)
        notes.append(f"policy: {policy} (tiny random-init Qwen2.5-VL, written now)")
    else:
        notes.append(f"policy: {cfg.model.policy}")
    checkpoint = Path(cfg.reward.sam2.checkpoint)
    sam2_dir = checkpoint.parent if checkpoint.suffix == ".pt" else checkpoint
    if sam2_dir.name == SAM2_TINY_DIRNAME and not checkpoint.exists():
        write_tiny_sam2(sam2_dir, seed=cfg.run.seed, image_size=cfg.reward.sam2.image_size or 256)
        notes.append(f"sam2: {cfg.reward.sam2.checkpoint} (tiny random-init SAM2, written now)")
    else:
        notes.append(f"sam2: {cfg.reward.sam2.checkpoint}")
    return notes


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, "demo")
    started = time.perf_counter()
    output_dir = Path(cfg.run.output_dir)
    config_path = save_config(cfg, output_dir / "config.yaml")
    notes = [ensure_dataset(cfg), *ensure_tiny_models(cfg)]
    print("\n".join(notes), flush=True)
    preflight.check("demo", [*preflight.training_problems(cfg), *preflight.evaluation_problems(cfg)])
    init_ray(cfg.placement)
    before = run_evaluation(cfg, output_dir / "eval_before")
    print("\nbefore GRPO\n" + format_report(before), flush=True)
    result = train(cfg)
    trained = copy.deepcopy(cfg)
    trained.model.policy = str(result["policy"])
    after = run_evaluation(trained, output_dir / "eval")
    print("\nafter GRPO\n" + format_report(after))
    print()
    print(f"finished in {time.perf_counter() - started:.0f} s; outputs:")
    print(f"  config        {config_path}")
    print(f"  metrics       {output_dir / 'metrics.jsonl'} ({result['steps']} GRPO steps)")
    print(f"  curves        {result['curves']}")
    print(f"  samples       {output_dir / 'samples'}/")
    print(f"  checkpoints   {output_dir / 'checkpoints'}/")
    print(f"  policy        {result['policy']}")
    print(
        f"  results       {after.output_dir / 'results.jsonl'} (before: {before.output_dir / 'results.jsonl'})"
    )
    print(f"  summary       {after.output_dir / 'summary.json'}")
    print(f"  overlays      {after.output_dir / 'overlays'}/")
    return 0
