"""`veason eval` against the release's way of evaluating, in one run, on the same GPU, weights and expressions.

Data: the synthetic world in the ReVOS layout at 720p (`--videos` videos of `--frames` frames, written in
parallel), every expression of the valid split, 8 evenly spaced frames per prompt. Models: a random-init
Qwen2.5-VL with the real 3B shapes (`benchmarks/rollout.py`'s writer) and a random-init SAM2.1 hiera-large at
its own 1024 px. Random weights never write a parsable answer, so decoding is constrained to the answer format
(`inference.constrain_answer`, vLLM's structured outputs): every answer names a keyframe and boxes, and SAM2
really runs.

- ours: `pipelines/evaluate.run_evaluation`, the Ray Data job (frames decoded on CPU actors, the policy on a
  vLLM engine in large batches, SAM2 on its actor, each video encoded once for all of its expressions, J/F/R on
  the GPU, mask PNGs written), end to end including the actors' start-up, and after the first result.
- release: for the first `--release-expressions` of those expressions, one after another, as the release's
  evaluation does: the 8 frames read from JPEG, Hugging Face `generate` at batch size 1 (greedy, made to write
  exactly as many tokens as our engine's answer to the same prompt), then SAM2's own `init_state` on the
  video's JPEG folder, the answer's boxes and a propagation forward and backward, then J, F and R on the CPU.
  Same answers, same SAM2 work, so the ratio measures the system, not the weights.

    python benchmarks/evaluate.py --out $OUT/evaluate.json         # GPU (device tool): ~8 min
    python benchmarks/evaluate.py --tiny                           # CPU check: tiny models, logical GPU
    python benchmarks/evaluate.py --tiny eval.scorers=1            # trailing key=value: config overrides
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.*` when run as a script
for _key, _value in {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}.items():
    os.environ.setdefault(_key, _value)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from veason_ray.config import VeasonConfig  # noqa: E402
from veason_ray.config_loading import load_config  # noqa: E402

T0 = time.perf_counter()
GOAL_RATIO = 10.0  # issue 20: >= 10x the release's way on one GPU
SAM2_LARGE = "configs/sam2.1/sam2.1_hiera_l.yaml"


def say(message: str) -> None:
    """A progress line with the seconds since the script started, flushed at once."""
    print(f"[{time.perf_counter() - T0:7.1f} s] {message}", flush=True)


def write_data(args: argparse.Namespace, work: Path) -> Path:
    from veason_ray.synth.writer import write_synthetic_dataset

    root = work / "revos"
    summary = write_synthetic_dataset(
        root,
        num_videos=args.videos + 1,  # one training video: the writer keeps at least one out of valid
        num_frames=args.frames,
        height=args.height,
        width=args.width,
        seed=args.seed,
        valid_fraction=1.0,
        workers=min(os.cpu_count() or 1, args.videos + 1),
    )
    say(summary.to_text().replace("\n", "; "))
    return root


def write_models(args: argparse.Namespace, work: Path) -> tuple[Path, Path, str]:
    """The policy folder, the SAM2 checkpoint and its config name."""
    if args.tiny:
        from veason_ray.models.tiny_qwen import write_tiny_qwen
        from veason_ray.models.tiny_sam2 import SAM2_TINY_CHECKPOINT, SAM2_TINY_CONFIG, write_tiny_sam2

        sam2 = write_tiny_sam2(work / "sam2_tiny", seed=0, image_size=256)
        return (
            write_tiny_qwen(work / "qwen2_5_vl_tiny", seed=0),
            sam2 / SAM2_TINY_CHECKPOINT,
            str(sam2 / SAM2_TINY_CONFIG),
        )
    from benchmarks.reward import write_random_checkpoint
    from benchmarks.rollout import write_random_3b_in_child

    policy = write_random_3b_in_child(work / "qwen2_5_vl_3b_random")
    return policy, write_random_checkpoint(SAM2_LARGE, work, seed=0, image_size=0), SAM2_LARGE


def build_config(
    args: argparse.Namespace, root: Path, policy: Path, sam2: Path, sam2_config: str
) -> VeasonConfig:
    overrides = [
        f"data.root={root}",
        "data.dataset=revos",
        f"data.eval_num_frames={args.num_frames}",
        f"model.policy={policy}",
        f"reward.sam2.checkpoint={sam2}",
        f"reward.sam2.config={sam2_config}",
        "reward.propagator=sam2",
        "inference.constrain_answer=true",
        f"inference.constrained_think_chars={args.think_chars}",
        "inference.constrained_max_boxes=4",
        f"eval.policy_batch_videos={args.videos}",
        "eval.score_oracle=false",  # the release scores only the policy's answers
        "eval.worst_overlays=0",
        "eval.max_expressions=0",
        "run.seed=0",
    ]
    if args.tiny:
        base = "configs/demo.yaml"
        overrides += [
            "inference.max_new_tokens=256",
            "reward.sam2.image_size=256",
            "placement.num_gpus=1",
            "placement.num_cpus=6",
            "rollout.gpus_per_engine=0.4",
            "reward.gpus_per_actor=0.4",
            "eval.scorers=1",
        ]
    else:
        base = "configs/qwen2.5vl-3b-1gpu.yaml"
        overrides += [
            "inference.max_new_tokens=1024",
            "model.dtype=bfloat16",
            "rollout.gpus_per_engine=0.5",
            "rollout.gpu_memory_utilization=0.4",
            "rollout.enable_sleep_mode=false",
            "rollout.max_model_len=8192",
            "reward.actors=1",
            "reward.gpus_per_actor=0.4",
            "reward.encode_batch_size=16",
            "eval.scorers=2",
            "eval.scorer_gpus=0.05",
            "data.decode_concurrency=4",
        ]
    return load_config(base, overrides + list(args.overrides))


def run_ours(cfg: VeasonConfig, out: Path) -> dict:
    from pipelines.evaluate import run_evaluation
    from pipelines.ray_runtime import init_ray
    from veason_ray.datasets import open_dataset

    init_ray(cfg.placement)
    say("ours: the evaluation job (engines and SAM2 start inside it)")
    report = run_evaluation(cfg, out)
    summary = report.summary
    dataset = open_dataset("revos", cfg.data.root, cfg.eval.split or cfg.data.eval_split)
    busy: dict[str, float] = {}
    counted = set()  # stage seconds are per video (per batch of videos for the policy): count each once
    for r in report.results:
        for stage, value in r.extra.get("seconds", {}).items():
            key = (stage, value) if stage == "policy" else (stage, r.video if stage != "score" else r.key)
            if key not in counted:
                counted.add(key)
                busy[stage] = busy.get(stage, 0.0) + value
    return {
        "summary": summary,
        "expressions": len(report.results),
        "failed": summary["failed"],
        "video_frames": sum(dataset.video(r.video).num_frames for r in report.results),
        "wall_s": summary["seconds"],
        "first_result_s": summary["first_result_s"],
        "first_results": summary["first_results"],
        "busy_s": busy,
        "results": report.results,
    }


def run_release(cfg: VeasonConfig, results: list, count: int) -> dict:
    """The release's way on the first `count` scored expressions (see the module docstring)."""
    from PIL import Image

    from benchmarks.reward import ReleasePropagator
    from veason_ray.datasets import open_dataset
    from veason_ray.inference import PolicyInput, locate_answer
    from veason_ray.metrics import score_expression
    from veason_ray.models.hf_policy import HFPolicy
    from veason_ray.models.loading import load_policy, load_sam2_video_predictor

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dataset = open_dataset("revos", cfg.data.root, cfg.eval.split or cfg.data.eval_split)
    model, processor = load_policy(cfg.model.policy, dtype=cfg.model.dtype, device=device)
    policy = HFPolicy(model, processor)
    predictor = load_sam2_video_predictor(
        cfg.reward.sam2.checkpoint, cfg.reward.sam2.config, image_size=cfg.reward.sam2.image_size or None,
        device=device,
    )  # fmt: skip
    times = {"decode": 0.0, "policy": 0.0, "sam2": 0.0, "metrics": 0.0}
    tokens, frames_done = 0, 0
    chosen = [r for r in results if r.error is None][:count]
    for index, result in enumerate(chosen):
        info = dataset.video(result.video)
        record = dataset.expression(result.video, result.exp_id)
        start = time.perf_counter()
        sampled = [
            np.asarray(Image.open(info.frame_uris[i]).convert("RGB").resize((560, 560), Image.BILINEAR))
            for i in result.frame_indices
        ]
        times["decode"] += time.perf_counter() - start
        start = time.perf_counter()
        target = len(processor.tokenizer(result.response)["input_ids"])
        inputs = policy.encode(
            [PolicyInput(result.expression, tuple(result.frame_indices), np.stack(sampled)).messages()]
        )
        with torch.inference_mode():
            policy.model.generate(**inputs, max_new_tokens=target, min_new_tokens=target, do_sample=False)
        _sync()
        times["policy"] += time.perf_counter() - start
        tokens += target
        start = time.perf_counter()
        answer = locate_answer(result.response, info.num_frames, info.height, info.width)
        propagator = ReleasePropagator(predictor, Path(info.frame_uris[0]).parent)
        shape = (info.num_frames, info.height, info.width, 3)
        masks = (
            propagator.propagate(np.zeros(shape, np.uint8), answer.keyframe, answer.boxes)
            if answer.usable
            else np.zeros(shape[:3], bool)
        )
        _sync()
        times["sam2"] += time.perf_counter() - start
        start = time.perf_counter()
        score_expression(
            masks, dataset.gt_masks(record), record.type_id, dataset.foreground(result.video), device="cpu"
        )
        times["metrics"] += time.perf_counter() - start
        frames_done += info.num_frames
        say(f"release: expression {index + 1}/{len(chosen)} ({target} tokens)")
    return {"expressions": len(chosen), "video_frames": frames_done, "tokens": tokens, "busy_s": times}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def table(args: argparse.Namespace, ours: dict, release: dict, device: str) -> str:
    wall = ours["wall_s"]
    ours_rate = ours["expressions"] / wall
    after_first = None
    if ours["first_result_s"] is not None and wall > ours["first_result_s"]:
        after_first = (ours["expressions"] - ours["first_results"]) / (wall - ours["first_result_s"])
    release_s = sum(release["busy_s"].values())
    release_rate = release["expressions"] / release_s
    lines = [
        f"\nEvaluation on {device}: {ours['expressions']} expressions of {args.videos} synthetic videos, "
        f"{args.frames} frames of {args.width}x{args.height} each, {args.num_frames} sampled frames per prompt",
        f"policy: Qwen2.5-VL {'tiny' if args.tiny else '3B shapes'} (random init, constrained answers); "
        f"SAM2: {'tiny 256 px' if args.tiny else 'SAM2.1 hiera-large 1024 px'} (random init)",
        "",
        "| | expressions/s | video frames/s | seconds per expression |",
        "|---|---:|---:|---:|",
        f"| ours, end to end (actors' start-up included) | {ours_rate:.3f} | "
        f"{ours['video_frames'] / wall:.1f} | {wall / ours['expressions']:.2f} |",
    ]
    if after_first:
        lines.append(
            f"| ours, after the first result | {after_first:.3f} | "
            f"{after_first * ours['video_frames'] / ours['expressions']:.1f} | {1 / after_first:.2f} |"
        )
    lines += [
        f"| release's way ({release['expressions']} expressions) | {release_rate:.3f} | "
        f"{release['video_frames'] / release_s:.1f} | {release_s / release['expressions']:.2f} |",
        "",
        f"ratio ours / release: {ours_rate / release_rate:.1f}x end to end"
        + (f", {after_first / release_rate:.1f}x after the first result" if after_first else "")
        + f" (goal {GOAL_RATIO:.0f}x)",
        "",
        "busy seconds per expression by stage (ours: stages overlap in the pipeline; release: one after another)",
    ]
    for stage, seconds in ours["busy_s"].items():
        lines.append(f"  ours     {stage:<12} {seconds / ours['expressions']:.3f}")
    for stage, seconds in release["busy_s"].items():
        lines.append(f"  release  {stage:<12} {seconds / release['expressions']:.3f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (a logical GPU)")
    parser.add_argument("--videos", type=int, default=12)
    parser.add_argument("--frames", type=int, default=80, help="frames per video (the issue: 60-100)")
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--num-frames", type=int, default=8, help="sampled frames per prompt")
    parser.add_argument("--think-chars", type=int, default=128, help="longest constrained think text")
    parser.add_argument("--release-expressions", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="a JSON file for the figures")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = parser.parse_args()
    if args.tiny:
        args.videos, args.frames, args.height, args.width = (
            min(args.videos, 3),
            min(args.frames, 12),
            120,
            160,
        )
        args.num_frames, args.think_chars, args.release_expressions = 4, 16, min(args.release_expressions, 2)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="eval_bench_"))
    say(f"device: {device}; work folder {work}")
    root = write_data(args, work)
    policy, sam2, sam2_config = write_models(args, work)
    say(f"models written: {policy.name}, {sam2.name}")
    cfg = build_config(args, root, policy, sam2, sam2_config)
    ours = run_ours(cfg, work / "eval_ours")
    say(f"ours: {ours['expressions']} expressions in {ours['wall_s']:.1f} s ({ours['failed']} failed)")
    import ray

    ray.shutdown()  # the engines' and SAM2's GPU memory goes back before the baseline loads its models
    if ours["failed"] == ours["expressions"]:
        errors = sorted({r.error for r in ours["results"] if r.error})
        raise SystemExit(f"every expression failed in our run: {errors[:3]}")
    release = run_release(cfg, ours["results"], args.release_expressions)
    text = table(args, ours, release, device)
    print(text, flush=True)
    if args.out:
        doc = {
            "device": device,
            "args": {k: v for k, v in vars(args).items() if k != "overrides"},
            "ours": {k: v for k, v in ours.items() if k not in ("results", "summary")},
            "release": release,
            "summary": ours["summary"],
            "table": text,
        }
        Path(args.out).write_text(json.dumps(doc, indent=2, default=str))
    if ours["failed"]:
        say(
            f"warning: {ours['failed']} expressions failed in our run (see {work / 'eval_ours'}/results.jsonl)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
