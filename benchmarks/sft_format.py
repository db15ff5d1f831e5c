"""Does CoT-SFT teach a small model the answer format? Parse rate on held-out prompts before and after
`veason sft` (issue 9: from ~0 to >= 95%).

1. model    a Qwen2.5-VL-shaped random-init model (`--hidden`, `--layers`, `--vision-depth`; the tiny model's
            byte-level tokenizer, processor and chat template), written in bf16 to <out>/model
2. data     a fresh synthetic world (`--videos` videos, ReVOS layout) and the offline teacher's CoT records
            (`veason cot cot.teacher=offline`, `--frames` frames each at 560x560) under <out>/data, <out>/cot;
            both folders are rewritten every run (a resumed `veason cot` keeps records of other settings out)
3. sft      `veason sft`: full fine-tune, about `--epochs` x train / `--batch-size` steps, lr `--lr` after
            `--warmup` steps of linear warm-up, then a cosine decay; on Ray local (one GPU rank in bf16, or
            `--workers` gloo ranks on CPU); greedy answers of the starting model and of the exported folder to
            `--eval-examples` held-out prompts, and the held-out NLL at every epoch's end
Writes <out>/sft/{metrics.jsonl (per step, as it goes), loss_curve.png, sft_summary.json, hf/} and
<out>/sft_format.json (after the data stage, then complete); progress lines carry the clock and the seconds
since the start. The exported folder <out>/sft/hf is a GRPO starting point (`model.policy=<out>/sft/hf`).

Why this recipe (docs/benchmarks.md, "CoT-SFT"): a parse needs every digit and bracket of the answer right
under greedy decoding, which a small random-init model gets only once its loss has settled: many distinct
examples (400 videos, ~2,100 records, each seen three times: held-out loss still falls) and an lr that decays at
the end.

    python benchmarks/sft_format.py --out /tmp/sft --stage data   # GPU machine: the world and its CoT
    python benchmarks/sft_format.py --out /tmp/sft --stage sft    # then SFT and both evaluations
    python benchmarks/sft_format.py --out /tmp/sft_cpu --videos 12 --hidden 128 --layers 2 --vision-depth 1 \\
        --frames 2 --image-pixels 12544 --epochs 2 --max-examples 24 --max-new-tokens 16   # the CPU path, ~2 min
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

for _key, _value in {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}.items():
    os.environ.setdefault(_key, _value)

from veason_ray.cpu_torch_workarounds import apply_cpu_workarounds  # noqa: E402
from veason_ray.synth.cli import add_object_arguments  # noqa: E402

apply_cpu_workarounds()

import torch  # noqa: E402

GOAL = 0.95  # issue 9: >= 95% of held-out answers parse after SFT
T0 = time.perf_counter()


def say(message: str) -> None:
    """A progress line with the clock and the seconds since the script started, flushed at once."""
    print(f"[{time.strftime('%H:%M:%S')} {time.perf_counter() - T0:6.0f} s] {message}", flush=True)


def small_qwen_sizes(
    vocab_size: int,
    hidden: int,
    layers: int,
    vision_depth: int,
    rope_theta: float = 1000000.0,
    mrope_section: tuple[int, int, int] = (8, 12, 12),
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The text and vision sizes of a small Qwen2.5-VL (`qwen2_5_vl_config`'s arguments): heads of 64, a vision
    tower of width hidden/2 with full attention in every block (one attention call per image instead of one per
    8x8-patch window). Qwen's rotary defaults, M-RoPE sections scaled by 1/2 to the heads of 64."""
    heads = max(1, hidden // 64)
    text_sizes = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 4),
        "max_position_embeddings": 32768,
        "max_window_layers": layers,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": rope_theta,
            "mrope_section": list(mrope_section),
        },
    }
    vision_hidden = max(64, hidden // 2)
    vision_sizes = {
        "depth": vision_depth,
        "hidden_size": vision_hidden,
        "intermediate_size": 2 * vision_hidden,
        "num_heads": vision_hidden // 32,
        "out_hidden_size": hidden,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "tokens_per_second": 2,
        "window_size": 112,
        "fullatt_block_indexes": list(range(vision_depth)),
    }
    return text_sizes, vision_sizes


def save_small_qwen(model: Any, processor: Any, out_dir: Path) -> Path:
    """Write `model` in bf16 with its processor as a policy folder: generation stops at <|im_end|> or
    <|endoftext|> and pads with the tokenizer's pad token."""
    config = model.config
    model = model.to(torch.bfloat16)
    model.generation_config.eos_token_id = [config.text_config.eos_token_id, config.text_config.bos_token_id]
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def write_small_qwen(
    out_dir: Path, hidden: int, layers: int, vision_depth: int, seed: int, image_pixels: int = 0
) -> Path:
    """A random-init Qwen2.5-VL of the given sizes with the tiny model's tokenizer and processor (as
    `write_tiny_qwen` writes its folder). Heads of 64 (M-RoPE sections [8, 12, 12], Qwen's scaled by 1/2),
    a vision tower of width hidden/2 with full attention in every block. `image_pixels` > 0 caps the image
    processor's pixels per image (`cap_image_pixels`)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from veason_ray.models.tiny_qwen import build_tiny_processor, cap_image_pixels, qwen2_5_vl_config

    processor = build_tiny_processor()
    if image_pixels > 0:
        cap_image_pixels(processor, image_pixels)
    text_sizes, vision_sizes = small_qwen_sizes(len(processor.tokenizer), hidden, layers, vision_depth)
    config = qwen2_5_vl_config(processor.tokenizer, text_sizes, vision_sizes)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    save_small_qwen(model, processor, out_dir)
    params = sum(p.numel() for p in model.parameters())
    say(
        f"model: {params / 1e6:.1f} M parameters (hidden {hidden}, {layers} layers, vision depth {vision_depth})"
    )
    return out_dir


def answer_token_lengths(records_path: Path, model_dir: Path) -> list[int]:
    """Tokens of each record's assistant answer (its end token included)."""
    from transformers import AutoTokenizer

    from veason_ray.cot.records import read_jsonl

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [len(tokenizer(r["messages"][2]["content"])["input_ids"]) + 1 for r in read_jsonl(records_path)]


def prepare_data(out: Path, videos: int, frames: int, seed: int, min_objects: int, max_objects: int) -> Path:
    """A fresh synthetic world under <out>/data (`min_objects` to `max_objects` objects per scene) and its
    offline-teacher CoT records under <out>/cot; the records file."""
    from pipelines.cli import main as veason
    from veason_ray.synth.writer import write_synthetic_dataset

    for stale in (out / "data", out / "cot", out / DATA_DONE):
        shutil.rmtree(stale, ignore_errors=True)
    write_synthetic_dataset(
        out / "data",
        layout="revos",
        num_videos=videos,
        num_frames=16,
        height=240,
        width=320,
        seed=seed,
        valid_fraction=0.1,
        min_objects=min_objects,
        max_objects=max_objects,
    )
    cot = [
        "cot",
        f"data.root={out / 'data'}",
        "cot.teacher=offline",
        f"cot.num_frames={frames}",
        f"cot.output_dir={out / 'cot'}",
        f"run.seed={seed}",
        "cot.progress_every_s=0",
    ]
    if veason(cot) != 0:
        raise SystemExit("sft_format: veason cot failed")
    return out / "cot" / "cot.jsonl"


DATA_DONE = "data_stage.json"  # written once model, world and CoT records are complete
DATA_ARGS = (
    "videos", "frames", "min_objects", "max_objects", "hidden", "layers", "vision_depth", "image_pixels", "seed"
)  # fmt: skip


def data_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments that shape what the data stage writes."""
    return {k: getattr(args, k) for k in DATA_ARGS}


def check_data_stage(out: Path, args: argparse.Namespace) -> None:
    """`--stage sft` needs a complete data stage made with the same sizes; otherwise say which to run."""
    marker = out / DATA_DONE
    if not marker.exists():
        raise SystemExit(f"sft_format: {out} has no complete data stage; run --stage data (or all) first")
    saved, wanted = json.loads(marker.read_text()), data_settings(args)
    differ = {k: (saved.get(k), wanted[k]) for k in wanted if saved.get(k) != wanted[k]}
    if differ:
        raise SystemExit(
            f"sft_format: {out}'s data stage was made with other settings (there, now): {differ}; "
            "pass the same ones or rerun --stage data"
        )


def write_result(out: Path, result: dict[str, Any]) -> None:
    (out / "sft_format.json").write_text(json.dumps(result, indent=2) + "\n")


def sft_overrides(
    args: argparse.Namespace, on_gpu: bool, out: Path, model_dir: Path, max_new: int
) -> list[str]:
    """The `veason sft` overrides of this benchmark: bf16 on one GPU, float32 on CPU ranks."""
    common = [
        f"model.policy={model_dir}",
        f"data.root={out / 'data'}",
        f"sft.records={out / 'cot' / 'cot.jsonl'}",
        f"sft.output_dir={out / 'sft'}",
        f"sft.epochs={args.epochs}",
        f"sft.lr={args.lr}",
        f"sft.warmup_steps={args.warmup}",
        f"sft.batch_size={args.batch_size}",
        f"sft.max_examples={args.max_examples}",
        f"sft.held_out_fraction={args.held_out}",
        f"sft.eval_every={args.eval_every}",
        f"sft.eval_max_new_tokens={max_new}",
        f"sft.eval_batch_size={args.eval_batch_size}",
        f"sft.eval_examples={args.eval_examples}",
        "learner.lora.enabled=false",
        "learner.zero_stage=2",
        "learner.gradient_checkpointing=false",
        f"learner.micro_batch_size={args.micro_batch_size or (args.batch_size if on_gpu else 4)}",
        "learner.freeze_vision=false",
        "trainer.wandb.mode=disabled",
        f"run.seed={args.seed}",
    ]
    if on_gpu:
        return common + [
            "learner.workers=1",
            "learner.gpus_per_worker=1",
            f"learner.cpus_per_worker={max(2, (os.cpu_count() or 4) // 2)}",
            "learner.bf16=true",
            "learner.export_dtype=bfloat16",
            "model.dtype=bfloat16",
        ]
    return common + [
        f"learner.workers={args.workers}",
        "learner.gpus_per_worker=0",
        "learner.cpus_per_worker=1",
        "learner.bf16=false",
        "learner.export_dtype=float32",
        "model.dtype=float32",
        f"placement.num_cpus={max(args.workers, 2)}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (model, data, cot, sft/hf, results)")
    parser.add_argument(
        "--stage",
        choices=("data", "sft", "all"),
        default="all",
        help="data: model, world and CoT records; sft: train and evaluate on them (two calls < 10 min)",
    )
    parser.add_argument("--videos", type=int, default=1200)
    parser.add_argument("--frames", type=int, default=4, help="frames per CoT record (method: up to 7)")
    add_object_arguments(parser)  # the world's objects per scene, as `veason synth`
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vision-depth", type=int, default=4)
    parser.add_argument(
        "--image-pixels",
        type=int,
        default=224 * 224,
        help="cap per image: 224x224 (64 visual tokens per frame), where the grounding probe learned to box; 0 = 560x560",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=3,
        help="H100: 4 epochs of 1,200 videos (711 steps at ~0.63 s) did not fit one 10-minute call",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=3e-4,
        help="peak lr (cosine decay after the warm-up); 1e-3 taught the format but never grounding (grounding probe)",
    )
    parser.add_argument("--warmup", type=int, default=50, help="optimizer steps of linear lr warm-up")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per optimizer step")
    parser.add_argument(
        "--micro-batch-size", type=int, default=0, help="0 = the whole batch on a GPU, 4 on CPU ranks"
    )
    parser.add_argument("--max-examples", type=int, default=0, help="0 = every record")
    parser.add_argument("--held-out", type=float, default=0.1)
    parser.add_argument("--eval-examples", type=int, default=64, help="held-out prompts answered; 0 = all")
    parser.add_argument("--eval-every", type=int, default=0, help="steps between parse-rate checks; 0 = none")
    parser.add_argument(
        "--eval-batch-size", type=int, default=64, help="HF generate costs ~per step: one big batch"
    )
    parser.add_argument("--max-new-tokens", type=int, default=0, help="0 = longest answer + 64")
    parser.add_argument("--workers", type=int, default=2, help="gloo ranks on CPU (one rank on a GPU)")
    parser.add_argument(
        "--init",
        default="",
        help="--stage sft starts from this policy folder instead of the data stage's random-init model: a "
        "grounding warm start (grounding_probe.py --save; same sizes and processor)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from pipelines.cli import main as veason

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    on_gpu = torch.cuda.is_available()
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if on_gpu else "cpu",
        "args": vars(args),
    }
    model_dir, records = out / "model", out / "cot" / "cot.jsonl"
    if args.stage in ("data", "all"):
        write_small_qwen(model_dir, args.hidden, args.layers, args.vision_depth, args.seed, args.image_pixels)
        prepare_data(out, args.videos, args.frames, args.seed, args.min_objects, args.max_objects)
        (out / DATA_DONE).write_text(json.dumps(data_settings(args)) + "\n")
    else:
        check_data_stage(out, args)
        say(f"data: reusing {model_dir} and {records} (--stage data)")
    lengths = answer_token_lengths(records, model_dir)
    max_new = args.max_new_tokens or max(lengths) + 64
    result.update(
        records=len(lengths),
        answer_tokens_mean=sum(lengths) / len(lengths),
        max_new_tokens=max_new,
        stage="sft",
    )
    write_result(out, result)
    say(
        f"data: {len(lengths)} records of {args.frames} frames, answer tokens mean "
        f"{sum(lengths) / len(lengths):.0f}, max {max(lengths)}; generating up to {max_new} tokens"
    )
    if args.stage == "data":
        say(f"stage data done; next: --stage sft with the same --out and sizes ({out})")
        return 0
    if args.init:
        model_dir = Path(args.init).resolve()
        if not (model_dir / "config.json").exists():
            raise SystemExit(f"sft_format: --init {model_dir} is no policy folder (no config.json)")
        say(f"sft: starting from {model_dir} (--init), not the random-init {out / 'model'}")
    if veason(["sft", *sft_overrides(args, on_gpu, out, model_dir, max_new)]) != 0:
        return 1
    summary = json.loads((out / "sft" / "sft_summary.json").read_text())
    result.update(
        **summary,
        stage="done",
        goal_parse_rate=GOAL,
        goal_met=summary["after"]["parse_rate"] >= GOAL,
        wall_seconds=time.perf_counter() - T0,
    )
    write_result(out, result)
    before, after = summary["before"], summary["after"]
    held = summary["final_held_out_loss"]
    say(f"sft_format: parse failures after SFT {after['failures']}; first answers:")
    for answer in after["samples"]:
        print(f"  {answer!r}")
    say(
        f"sft_format: parse rate {before['parse_rate']:.1%} -> {after['parse_rate']:.1%} "
        f"(goal >= {GOAL:.0%}: {'met' if result['goal_met'] else 'NOT met'}), format reward "
        f"{before['format_reward_mean']:.3f} -> {after['format_reward_mean']:.3f} on {after['examples']} held-out "
        f"prompts; grounding: teacher's keyframe {after.get('teacher_keyframe_rate', 0):.1%}, box IoU there "
        f"{after.get('teacher_box_iou_mean', 0):.3f}; loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f} (held-out "
        f"{'n/a' if held is None else f'{held:.3f}'}) in {summary['steps']} steps; {result['wall_seconds']:.0f} s; "
        f"exported {summary['export']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
