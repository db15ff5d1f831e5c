"""Padded against packed micro-batches on one GPU: the same sequences through the policy's forward and backward
both ways (`learner.micro_batch_tokens` 0 vs > 0), each also with its attention bucketed
(`learner.attention_bucket_tokens`: lengths rounded up, causal, no padding mask), side by side in one process:
seconds, tokens fed, peak memory, and how far each layout's log-probs and entropies are from the exact padded
ones (bf16 on the GPU; the CPU tests hold them equal to 1e-5 in float32: tests/test_policy_forward.py).

Default (GPU): a random-init Qwen2.5-VL with the 3B shapes (`benchmarks/rollout.py`'s writer, or `--model DIR`
where it is written if missing), bf16, gradient checkpointing, as the learner loads it; `--groups` GRPO groups of
n = 8 responses of the realistic spread (100 + geometric, mean ~250, capped at `--max-new-tokens`) to a prompt of
6 frames at 560x560 (~2,600 tokens). Padded: one micro-batch per group (the 1-GPU config's micro_batch_size=8).
Packed: the groups packed by `--micro-batch-tokens`. Each layout: one untimed pass, then `--repeats` timed ones.
Every pass draws new response lengths (the same for every layout), as training's steps do: an attention kernel
that plans per shape (PyTorch's cuDNN attention) pays for it in each pass, as it does in training.
`--same-lengths` repeats the first pass's sequences instead (what a warm-up then hides). `--backends` runs every
layout under each of PyTorch's SDPA backends named (auto: PyTorch's own choice).

    python benchmarks/packed_microbatch.py --backends auto,flash   # GPU, 3B shapes
    python benchmarks/packed_microbatch.py --tiny                  # CPU check: tiny model
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.rollout import make_groups, realistic_lengths, write_random_3b  # noqa: E402
from veason_ray.config import LearnerConfig  # noqa: E402
from veason_ray.training.deepspeed_engine import load_trainable_policy  # noqa: E402
from veason_ray.training.grpo_update import plan_micro_batches  # noqa: E402
from veason_ray.training.packed_attention import enable_packed_attention  # noqa: E402
from veason_ray.training.policy_forward import response_logprobs  # noqa: E402
from veason_ray.training.sequences import (  # noqa: E402
    EncodedPrompt,
    PolicySequence,
    collate,
    encode_prompt,
)


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def build_prompts(processor, args: argparse.Namespace) -> list[EncodedPrompt]:
    return [
        encode_prompt(processor, g.sample.messages())
        for g in make_groups(args.groups, args.frames, args.size)
    ]


def draw_sequences(prompts: list[EncodedPrompt], processor, args: argparse.Namespace, seed: int):
    """n responses of random tokens and realistic lengths to each prompt (the draw of pass `seed`)."""
    rng = np.random.default_rng(seed)
    vocab = min(processor.tokenizer.vocab_size, 150000)
    sequences = []
    for prompt in prompts:
        for length in realistic_lengths(rng, args.n, args.max_new_tokens):
            response = torch.as_tensor(rng.integers(100, vocab, length), dtype=torch.long)
            sequences.append(PolicySequence(prompt, response, advantage=float(rng.standard_normal())))
    return sequences


SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}  # fmt: skip


def sdpa_backend(name: str):
    """A context running SDPA on one backend (`auto`: PyTorch's priority order)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name == "auto":
        return contextlib.nullcontext()
    return sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[name])])


def run_layout(model, passes, layout: LearnerConfig, device) -> dict:
    """Forward + backward of every micro-batch of each pass (loss: sum of log-probs and entropies over loss
    tokens); the first pass untimed. Returns the median seconds of the timed passes, the tokens fed and the
    log-probs and entropies of the first pass per sequence."""
    seconds, fed, values = [], 0, []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    packed, bucket = layout.micro_batch_tokens > 0, layout.attention_bucket_tokens
    for attempt, sequences in enumerate(passes):
        chunks = plan_micro_batches(sequences, layout)  # as the learner plans them
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for chunk in chunks:
            batch = collate(chunk, 0, packed=packed, attention_bucket=bucket).to(device)
            logprobs, entropy = response_logprobs(model, batch, with_entropy=True, chunk_tokens=2048)
            ((logprobs + 1e-3 * entropy) * batch.response_mask).sum().backward()
            if attempt == 0:
                fed += batch.input_ids.numel()
                values += [
                    (logprobs[i, :n].detach().float().cpu(), entropy[i, :n].detach().float().cpu())
                    for i, n in enumerate(batch.response_lengths)
                ]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if attempt:  # the first pass is the untimed warm-up
            seconds.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"seconds": float(np.median(seconds)), "fed": fed, "values": values, "peak_gib": peak,
            "micro_batches": len(chunks)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="the tiny model on CPU, float32 (a check)")
    parser.add_argument("--model", default="", help="the 3B-shaped folder (written there if missing)")
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--size", type=int, default=560)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--micro-batch-size", type=int, default=8, help="padded: sequences a micro-batch")
    parser.add_argument("--micro-batch-tokens", type=int, default=32768, help="packed: tokens a micro-batch")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--bucket", type=int, default=128, help="learner.attention_bucket_tokens of the bucketed"
    )
    parser.add_argument(
        "--backends", default="auto", help="comma-separated: auto, cudnn, flash, efficient, math"
    )
    parser.add_argument("--same-lengths", action="store_true", help="every pass the first pass's sequences")
    args = parser.parse_args()
    unknown = set(args.backends.split(",")) - {"auto", *SDPA_BACKENDS}
    if unknown:
        parser.error(f"--backends: {sorted(unknown)} unknown; take any of auto, {', '.join(SDPA_BACKENDS)}")
    if args.tiny:
        args.groups, args.n, args.frames, args.size, args.max_new_tokens = 2, 4, 2, 112, 160
        args.micro_batch_size, args.micro_batch_tokens, args.repeats, args.bucket = 4, 2048, 1, 32
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            from veason_ray.models.tiny_qwen import write_tiny_qwen

            model_dir = write_tiny_qwen(Path(tmp) / "qwen2_5_vl_tiny", seed=0)
        else:
            model_dir = Path(args.model or Path(tmp) / "qwen2_5_vl_3b_random")
            if not (model_dir / "config.json").is_file():
                say(f"writing the random 3B-shaped policy to {model_dir}")
                write_random_3b(model_dir)
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(model_dir)
        cfg = LearnerConfig(bf16=not args.tiny, gradient_checkpointing=True)
        model = load_trainable_policy(str(model_dir), cfg, "sdpa").to(device)
        enable_packed_attention(model)  # a call without row bounds stays plain SDPA: the padded layouts
        model.train()
        prompts = build_prompts(processor, args)
        draws = 1 if args.same_lengths else args.repeats + 1
        passes = [draw_sequences(prompts, processor, args, seed) for seed in range(draws)]
        passes += [passes[0]] * (args.repeats + 1 - draws)
        lengths = [int(s.response_ids.numel()) for p in passes for s in p]
        say(f"{len(passes)} passes of {len(passes[0])} sequences, prompt {len(prompts[0])} tokens, responses mean "
            f"{np.mean(lengths):.0f} (min {min(lengths)}, max {max(lengths)}), "
            f"{'the same' if args.same_lengths else 'new'} lengths each pass")  # fmt: skip
        padded = replace(cfg, micro_batch_size=args.micro_batch_size, micro_batch_tokens=0)
        packed = replace(padded, micro_batch_tokens=args.micro_batch_tokens)
        layouts = {"padded": padded, "packed": packed}
        if args.bucket > 0:
            layouts |= {f"{name}, bucket {args.bucket}": replace(layout, attention_bucket_tokens=args.bucket)
                        for name, layout in list(layouts.items())}  # fmt: skip
        rows = {}
        for backend in args.backends.split(","):
            for name, layout in layouts.items():
                label = f"{name} ({backend})"
                try:
                    with sdpa_backend(backend):
                        rows[label] = run_layout(model, passes, layout, device)
                except RuntimeError as error:  # a backend that cannot run this layout (a mask, a shape)
                    say(f"{label}: not run: {str(error).splitlines()[0][:160]}")
                    model.zero_grad(set_to_none=True)
                    continue
                say(f"{label}: {rows[label]['seconds']:.2f} s forward + backward")
    real = sum(s.num_tokens for s in passes[0])
    base = next(iter(rows.values()))
    print(f"\nPadded vs packed micro-batches, {'tiny' if args.tiny else 'Qwen2.5-VL 3B shapes'} on "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}: {len(passes[0])} sequences a "
          f"pass ({real:,} real tokens in the first), responses {np.mean(lengths):.0f} mean / {max(lengths)} max, "
          f"{'the same' if args.same_lengths else 'new'} lengths each pass; differences against the first row")  # fmt: skip
    print("layout (SDPA backend) | micro-batches | tokens fed (with padding) | forward + backward s | vs first | "
          "peak GiB | logprob diff max / mean | entropy diff max")  # fmt: skip
    for name, row in rows.items():
        pairs = list(zip(row["values"], base["values"], strict=True))
        lp = max(float((a[0] - b[0]).abs().max()) for a, b in pairs)
        diffs = torch.cat([(a[0] - b[0]).abs() for a, b in pairs])
        ent = max(float((a[1] - b[1]).abs().max()) for a, b in pairs)
        print(f"{name} | {row['micro_batches']} | {row['fed']:,} | {row['seconds']:.2f} | "
              f"{base['seconds'] / row['seconds']:.2f}x | {row['peak_gib']:.1f} | {lp:.2e} / {float(diffs.mean()):.2e} | "
              f"{ent:.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
