"""Where the learner's update goes: the policy's forward + backward of GRPO micro-batches on one GPU, timed for
each variant of config overrides, the parts alone, and a torch.profiler table of one micro-batch.

In-process, plain torch: no Ray, no DeepSpeed (ZeRO-2's gradient hooks and the optimizer step are measured by
`benchmarks/learner.py`). A random-init Qwen2.5-VL of the 3B shapes, bf16, micro-batches of whole GRPO groups
(6 frames at 560x560, ~2,750 prompt tokens) with `--response-tokens` each (1,024: the paper's step with random
weights). Per variant: seconds per micro-batch of the policy's forward + GRPO loss + backward, of the reference
forward (the policy under no_grad: the same compute), the peak memory, and both extrapolated to the paper's
128 sequences; and its numerics against the first variant of its micro-batch size on the same micro-batch (max
|difference| of log-probs and entropies, relative difference of three parameters' gradients; the first variant
against a second run of itself: the kernels' run-to-run noise). Then, alone: the vision tower's forward + backward of one group's frames, and the LM head's
log-probs + entropy forward + backward over one micro-batch's response tokens (the plain path and the chunked
one); the rest of a micro-batch is the language model's layers (forward, recompute, backward). Last, the
profiler's kernels of one micro-batch of `--profile`'s variant: by kind and the top 25.

    python benchmarks/profile_update.py --out $OUT/profile.json     # GPU: variants old and new, profile new
    python benchmarks/profile_update.py --variants "mb16:learner.micro_batch_size=16"
    python benchmarks/profile_update.py --tiny                       # CPU check of the script
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

for _key, _value in {"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}.items():
    os.environ.setdefault(_key, _value)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.learner import learner_config, parse_variants, progress  # noqa: E402
from benchmarks.rollout import make_groups, write_random_3b  # noqa: E402
from veason_ray.config import LearnerConfig  # noqa: E402
from veason_ray.grpo import grpo_policy_loss  # noqa: E402
from veason_ray.models.fused_elementwise import fuse_elementwise  # noqa: E402
from veason_ray.training.policy_forward import ChunkedTokenLogprobs, response_logprobs  # noqa: E402
from veason_ray.training.sequences import MicroBatch, PolicySequence, collate, encode_prompt  # noqa: E402

SEQUENCES = 128  # the paper's batch: 16 prompts x 8 responses
CHECKED_GRADIENTS = (  # the LM head (tied to the embeddings), a layer below it, the vision tower's first block
    "model.language_model.embed_tokens.weight",
    "model.language_model.layers.0.mlp.up_proj.weight",
    "model.visual.blocks.0.attn.qkv.weight",
)
DEFAULT_VARIANTS = "old:learner.logprob_chunk_tokens=0;new:"
KERNEL_KINDS = (  # profiler kernel name -> kind, first match wins
    ("matmul", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|matmul", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|attn", re.I)),
    ("softmax / norm / reduce", re.compile(r"reduce|softmax|norm|logsumexp", re.I)),
    ("copy / cast / index", re.compile(r"copy|cast|gather|scatter|index|cat|fill", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|unrolled", re.I)),
)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(work: Callable[[], object], repeats: int) -> float:
    """Median seconds of `work` over `repeats` runs after one untimed run."""
    work()
    synchronize()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        synchronize()
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds))


def make_batches(
    processor: object, rows: int, group_size: int, frames: int, size: int, response_tokens: int, vocab: int
) -> MicroBatch:
    """One micro-batch of `rows` sequences: whole groups of `group_size` responses to one prompt each."""
    rng = np.random.default_rng(1)
    pad_id = processor.tokenizer.pad_token_id or 0
    sequences = []
    for group in make_groups(-(-rows // group_size), frames, size):
        prompt = encode_prompt(processor, group.sample.messages())
        for _ in range(group_size):
            tokens = torch.as_tensor(rng.integers(100, vocab, response_tokens))
            sequences.append(PolicySequence(prompt, tokens, advantage=float(rng.standard_normal())))
    return collate(sequences[:rows], pad_id)


def policy_step(model: object, batch: MicroBatch, cfg: LearnerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The update's work on one micro-batch: reference-free GRPO loss (old = own log-probs), backward. Returns
    the (detached) log-probs and entropies."""
    logprobs, entropy = response_logprobs(
        model, batch, with_entropy=True, chunk_tokens=cfg.logprob_chunk_tokens
    )
    loss, _ = grpo_policy_loss(
        logprobs, logprobs.detach(), batch.advantages, batch.response_mask, None, entropy, cfg.loss
    )
    loss.backward()
    return logprobs.detach(), entropy.detach()


def numerics(model: object, batch: MicroBatch, cfg: LearnerConfig) -> dict[str, torch.Tensor]:
    """One micro-batch's response log-probs and entropies and the gradients of CHECKED_GRADIENTS (on the CPU),
    from zero gradients."""
    model.zero_grad(set_to_none=False)
    logprobs, entropy = policy_step(model, batch, cfg)
    valid = batch.response_mask.bool()
    out = {"logprobs": logprobs[valid].float().cpu(), "entropy": entropy[valid].float().cpu()}
    params = dict(model.named_parameters())
    out.update({n: params[n].grad.to("cpu", torch.float32, copy=True) for n in CHECKED_GRADIENTS})
    model.zero_grad(set_to_none=False)
    return out


def numerics_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max |difference| of log-probs and entropies, and |g - g_want| / |g_want| of each checked gradient."""
    diff = {key: float((got[key] - want[key]).abs().max()) for key in ("logprobs", "entropy")}
    for name in CHECKED_GRADIENTS:
        diff[name] = float((got[name] - want[name]).norm() / want[name].norm())
    return diff


def measure_variant(
    name: str, model: object, processor: object, cfg: LearnerConfig, args: argparse.Namespace, vocab: int
) -> tuple[dict, dict[str, torch.Tensor]]:
    """The variant's timings (a table row) and its `numerics` on the same micro-batch as every variant of its
    micro-batch size."""
    fuse_elementwise(model, cfg.fused_elementwise)  # compiled at the variant's first micro-batch (numerics)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    rows = cfg.micro_batch_size
    batch = make_batches(
        processor, rows, args.group_size, args.frames, args.size, args.response_tokens, vocab
    )
    batch = batch.to(args.device)
    model.train()
    snapshot = numerics(model, batch, cfg)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    policy = timed(lambda: policy_step(model, batch, cfg), args.repeats)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    model.zero_grad(set_to_none=False)
    model.eval()
    with torch.no_grad():
        reference = timed(
            lambda: response_logprobs(model, batch, chunk_tokens=cfg.logprob_chunk_tokens), args.repeats
        )
    per_update = SEQUENCES / rows
    row = {
        "variant": name,
        "micro_batch_size": rows,
        "logprob_chunk_tokens": cfg.logprob_chunk_tokens,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "fused_elementwise": cfg.fused_elementwise,
        "tokens_per_micro_batch": batch.tokens,
        "policy_s_per_micro_batch": policy,
        "reference_s_per_micro_batch": reference,
        "policy_s_per_update": policy * per_update,
        "reference_s_per_update": reference * per_update,
        "peak_gib": peak,
    }
    progress(f"{name}: {json.dumps(row)}")
    return row, snapshot


def measure_parts(model: object, processor: object, cfg: LearnerConfig, args: argparse.Namespace) -> dict:
    """Seconds of the vision tower (one group's frames) and of the LM head over one micro-batch's response
    tokens (plain and chunked), forward + backward, each alone."""
    model.train()
    prompt = encode_prompt(processor, make_groups(1, args.frames, args.size)[0].sample.messages())
    pixels = prompt.vision_inputs["pixel_values"].to(args.device)
    grid = prompt.vision_inputs["image_grid_thw"].to(args.device)

    def vision() -> None:
        features = torch.cat(model.model.get_image_features(pixels, grid).pooler_output)
        features.float().square().mean().backward()

    head = model.lm_head.weight
    tokens = cfg.micro_batch_size * args.response_tokens
    hidden = torch.randn(tokens, head.shape[1], device=head.device, dtype=head.dtype, requires_grad=True)
    targets = torch.randint(0, head.shape[0], (tokens,), device=head.device)

    def lm_head(chunk: int) -> Callable[[], None]:
        def run() -> None:
            if chunk:
                logprobs, entropy = ChunkedTokenLogprobs.apply(hidden, head, targets, chunk, True)
            else:
                logits = (hidden @ head.T).float()
                log_norm = torch.logsumexp(logits, -1)
                logprobs = logits.gather(-1, targets[:, None]).squeeze(-1) - log_norm
                entropy = log_norm - (torch.softmax(logits, -1) * logits).sum(-1)
            (logprobs.sum() + entropy.sum()).backward()

        return run

    parts = {
        "vision_s_per_group": timed(vision, args.repeats),
        "lm_head_plain_s_per_micro_batch": timed(lm_head(0), args.repeats),
        "lm_head_chunked_s_per_micro_batch": timed(lm_head(cfg.logprob_chunk_tokens or 2048), args.repeats),
        "lm_head_tokens": tokens,
    }
    model.zero_grad(set_to_none=False)
    progress(f"parts: {json.dumps(parts)}")
    return parts


def profile_table(
    model: object, processor: object, cfg: LearnerConfig, args: argparse.Namespace, vocab: int
) -> dict:
    """One micro-batch under torch.profiler: device time by kernel kind, and the top 25 kernels printed."""
    from torch.profiler import ProfilerActivity, profile

    model.train()
    batch = make_batches(
        processor, cfg.micro_batch_size, args.group_size, args.frames, args.size, args.response_tokens, vocab
    ).to(args.device)
    policy_step(model, batch, cfg)  # warm
    synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        policy_step(model, batch, cfg)
        synchronize()
    model.zero_grad(set_to_none=False)
    events = prof.key_averages()
    sort_key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(events.table(sort_by=sort_key, row_limit=25, max_name_column_width=70), flush=True)
    kinds: dict[str, float] = {}
    for event in events:
        device_us = getattr(event, "self_device_time_total", 0.0)
        if not device_us or event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        kind = next((k for k, pattern in KERNEL_KINDS if pattern.search(event.key)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + device_us / 1e6
    total = sum(kinds.values())
    print("kernel kind | device s | share")
    for kind, seconds in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"{kind} | {seconds:.3f} | {seconds / max(total, 1e-9):.1%}")
    return {"device_s_by_kind": kinds, "device_s": total}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU (a check of the script)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help='"name:key=value,...;name2:..."')
    parser.add_argument("--profile", default="new", help="the variant to profile ('' for none)")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--response-tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    args.frames, args.size = (2, 112) if args.tiny else (6, 560)
    if args.tiny:
        args.group_size, args.response_tokens, args.repeats = 2, 16, 1
    args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    variants = parse_variants(args.variants)
    from transformers import AutoConfig, AutoProcessor

    from veason_ray.training.deepspeed_engine import load_trainable_policy

    results: dict = {"variants": []}
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            from veason_ray.models.tiny_qwen import write_tiny_qwen

            model_dir = str(write_tiny_qwen(Path(tmp) / "qwen2_5_vl_tiny", seed=0))
        else:
            model_dir = str(write_random_3b(Path(tmp) / "qwen2_5_vl_3b_random"))
        progress("model written")
        vocab = min(AutoConfig.from_pretrained(model_dir).text_config.vocab_size, 150000)
        processor = AutoProcessor.from_pretrained(model_dir)
        configs = {  # a micro-batch is one group unless a variant says otherwise
            name: learner_config("full", args.tiny, args.group_size, overrides).learner
            for name, overrides in variants.items()
        }
        model = load_trainable_policy(model_dir, next(iter(configs.values()))).to(args.device)
        progress("model loaded")
        first: dict[int, dict[str, torch.Tensor]] = {}  # micro-batch size -> the first variant's numerics
        for name, cfg in configs.items():
            row, snapshot = measure_variant(name, model, processor, cfg, args, vocab)
            size = cfg.micro_batch_size
            if size in first:
                row["vs_first"] = numerics_diff(snapshot, first[size])
            else:  # the same variant again: the run-to-run noise of the kernels (atomics in backward)
                first[size] = snapshot
                batch = make_batches(
                    processor, size, args.group_size, args.frames, args.size, args.response_tokens, vocab
                ).to(args.device)
                model.train()
                row["vs_first"] = numerics_diff(numerics(model, batch, cfg), snapshot)
            progress(f"{name}: vs the first variant of micro-batch {size}: {json.dumps(row['vs_first'])}")
            results["variants"].append(row)
        chosen = configs.get(args.profile)
        if chosen is not None:
            results["parts"] = measure_parts(model, processor, chosen, args)
            results["profile"] = profile_table(model, processor, chosen, args, vocab)
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    print(f"\nPolicy forward + backward per micro-batch, {args.response_tokens} response tokens, {device}")
    print("variant | micro-batch | chunk | checkpointing | fused | s / micro-batch | ref s / micro-batch | "
          f"s / {SEQUENCES} seq | ref s / {SEQUENCES} seq | peak GiB")  # fmt: skip
    for r in results["variants"]:
        print(
            f"{r['variant']} | {r['micro_batch_size']} | {r['logprob_chunk_tokens']} | "
            f"{r['gradient_checkpointing']} | {r['fused_elementwise']} | {r['policy_s_per_micro_batch']:.2f} | "
            f"{r['reference_s_per_micro_batch']:.2f} | {r['policy_s_per_update']:.1f} | "
            f"{r['reference_s_per_update']:.1f} | {r['peak_gib']:.1f}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"device": device, **results}, indent=1))


if __name__ == "__main__":
    main()
