"""Learner benchmark: one GRPO update of Qwen2.5-VL-3B shapes on the DeepSpeed learner group.

Default (GPU): a random-init Qwen2.5-VL-3B (real shapes, the tiny tokenizer), 16 groups x 8 responses = 128
sequences of 6 frames at 560x560 (~2,500 prompt tokens) + 300 response tokens, one learner rank on one GPU,
bf16, gradient checkpointing, the reference model for the KL term. Two settings, each timed on a full update
after a small untimed one (`--warmup-sequences`; it pays the one-off costs: DeepSpeed's CPU Adam build,
allocator warm-up):
    full   all 3.75 B parameters, ZeRO-2, optimizer states offloaded to CPU (DeepSpeedCPUAdam)
    lora   LoRA rank 64 on the language model's linear layers, reference = the policy with adapters off
Prints seconds per update (and of it, the reference model's forward passes and the optimizer step; the rest is
the policy's forward and backward), tokens/s ((prompt + response) tokens / update seconds), response tokens/s and the
peak GPU memory of the rank. `--variants` runs each setting once per named list of config overrides, one
learner group after the other on the same machine (e.g. a change against its old path, in one call).

    python benchmarks/learner.py                  # GPU, 3B shapes
    python benchmarks/learner.py --tiny           # CPU check: tiny model, 2 gloo ranks
    python benchmarks/learner.py --settings full \
        --variants "old:learner.logprob_chunk_tokens=0,learner.optimizer_threads=1;new:"
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

for _key, _value in {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}.items():
    os.environ.setdefault(_key, _value)

import json  # noqa: E402

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from actors.learner import LearnerGroup  # noqa: E402
from benchmarks.rollout import make_groups, realistic_lengths, write_random_3b  # noqa: E402
from veason_ray.config import VeasonConfig  # noqa: E402
from veason_ray.config_loading import load_config  # noqa: E402
from veason_ray.records import TrainItem  # noqa: E402


def make_items(
    groups: int, n: int, frames: int, size: int, response_tokens: int, vocab: int, realistic: bool = False
) -> list[TrainItem]:
    """n responses of random text tokens per group, advantages of a real group; each of exactly
    `response_tokens` tokens, or (`realistic`) of lengths drawn from the realistic spread capped there."""
    rng = np.random.default_rng(1)
    items = []
    for group in make_groups(groups, frames, size):
        advantages = rng.standard_normal(n)
        lengths = realistic_lengths(rng, n, response_tokens) if realistic else [response_tokens] * n
        for i in range(n):
            tokens = rng.integers(100, vocab, lengths[i]).tolist()
            items.append(TrainItem(group, tokens, [], float(advantages[i])))
    return items


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def learner_config(
    setting: str, tiny: bool, micro_batch_size: int, overrides: list[str] | None = None
) -> VeasonConfig:
    """The setting's learner config, then `overrides` (dotted KEY=VALUE, as on the command line)."""
    yaml_bool = {True: "true", False: "false"}
    return load_config(
        None,
        [
            f"learner.workers={2 if tiny else 1}",
            f"learner.gpus_per_worker={0 if tiny else 1}",
            f"learner.micro_batch_size={micro_batch_size}",
            f"learner.bf16={yaml_bool[not tiny]}",
            "learner.gradient_checkpointing=true",
            "learner.zero_stage=2",
            f"learner.offload_optimizer={yaml_bool[setting == 'full' and not tiny]}",
            f"learner.lora.enabled={yaml_bool[setting == 'lora']}",
            f"model.dtype={'float32' if tiny else 'bfloat16'}",
            *(overrides or []),
        ],
    )


def parse_variants(text: str) -> dict[str, list[str]]:
    """ "old:a=1,b=2;new:" -> {"old": ["a=1", "b=2"], "new": []}; empty text: one variant of the defaults."""
    variants = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, overrides = part.partition(":")
        variants[name.strip()] = [o.strip() for o in overrides.split(",") if o.strip()]
    return variants or {"default": []}


def run_setting(
    setting: str, overrides: list[str], model_dir: str, items: list[TrainItem], args: argparse.Namespace
) -> dict:
    cfg = learner_config(setting, args.tiny, args.micro_batch_size, overrides)
    start = time.perf_counter()
    group = LearnerGroup(cfg, model_dir)
    setup = time.perf_counter() - start
    progress(f"{setting}: learner group up in {setup:.0f} s")
    try:
        first = group.update(items[: args.warmup_sequences])  # one-off costs: CPU Adam build, allocator
        progress(
            f"{setting}: warm-up update of {first['sequences']:.0f} sequences {first['update_seconds']:.1f} s"
        )
        group.device_memory()  # reset the peak: the full update is the measured one
        second = group.update(items)
        progress(f"{setting}: update of {second['sequences']:.0f} sequences {second['update_seconds']:.1f} s")
        memory = group.device_memory()[0]
    finally:
        group.shutdown()
    return {
        "setting": setting,
        "overrides": overrides,
        "setup_s": setup,
        "first_s": first["update_seconds"],
        "warmup_sequences": first["sequences"],
        "update_s": second["update_seconds"],
        "reference_s": second["reference_seconds"],
        "optimizer_s": second["optimizer_seconds"],
        "tokens": second["tokens"],
        "response_tokens": second["response_tokens"],
        "tok_s": second["tokens_per_second"],
        "resp_tok_s": second["response_tokens"] / second["update_seconds"],
        "peak_gib": memory.get("peak_allocated_gib", float("nan")),
        "trainable": group.setup_info[0]["trainable_params"],
        "grad_norm": second["grad_norm"],
        "loss": second["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny model, 2 CPU ranks (a check of the script)")
    parser.add_argument("--settings", default="full,lora")
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--response-tokens", type=int, default=300)
    parser.add_argument(
        "--response-lengths",
        choices=("fixed", "realistic"),
        default="fixed",
        help="fixed: every response --response-tokens long; realistic: 100 + geometric (mean ~250) capped there",
    )
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--warmup-sequences", type=int, default=8, help="the untimed first update's size")
    parser.add_argument("--variants", default="", help='"name:key=value,...;name2:..." config overrides')
    parser.add_argument("--out", default="", help="write the rows as JSON here too")
    args = parser.parse_args()
    if args.tiny:
        args.groups, args.n, args.response_tokens, args.micro_batch_size = 2, 2, 16, 2
        args.warmup_sequences = 2
    frames, size = (2, 112) if args.tiny else (6, 560)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            from veason_ray.models.tiny_qwen import write_tiny_qwen

            model_dir = str(write_tiny_qwen(Path(tmp) / "qwen2_5_vl_tiny", seed=0))
        else:
            model_dir = str(write_random_3b(Path(tmp) / "qwen2_5_vl_3b_random"))
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(model_dir).text_config.vocab_size
        realistic = args.response_lengths == "realistic"
        items = make_items(
            args.groups, args.n, frames, size, args.response_tokens, min(vocab, 150000), realistic
        )
        rows = []
        for setting in args.settings.split(","):
            for name, overrides in parse_variants(args.variants).items():
                rows.append({"variant": name, **run_setting(setting, overrides, model_dir, items, args)})
                print(f"done: {rows[-1]}", flush=True)
                if args.out:
                    Path(args.out).write_text(json.dumps(rows, indent=1))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    lengths = [len(i.token_ids) for i in items]
    print(f"\nLearner: one GRPO update, {len(items)} sequences, {frames} frames at {size}, {args.response_lengths} "
          f"response lengths (mean {np.mean(lengths):.0f}, min {min(lengths)}, max {max(lengths)}), micro-batch "
          f"{args.micro_batch_size} unless packed, {device}")  # fmt: skip
    header = (
        "setting",
        "variant",
        "trainable",
        "setup s",
        "1st update s",
        "update s",
        "of it: reference s",
        "optimizer step s",
        "tokens",
        "tok/s",
        "resp tok/s",
        "peak GiB",
        "loss",
        "grad norm",
    )
    print(" | ".join(header))
    for r in rows:
        print(
            f"{r['setting']} | {r['variant']} | {r['trainable'] / 1e6:.1f} M | {r['setup_s']:.0f} | {r['first_s']:.1f} | "
            f"{r['update_s']:.1f} | {r['reference_s']:.1f} | {r['optimizer_s']:.1f} | {r['tokens']:.0f} | {r['tok_s']:.0f} | {r['resp_tok_s']:.0f} | {r['peak_gib']:.1f} | {r['loss']:.6g} | {r['grad_norm']:.6g}"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
