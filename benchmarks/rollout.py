"""Rollout pool benchmark: vLLM engines vs plain Hugging Face generate on the same multi-image prompts.

Default (GPU): a random-init Qwen2.5-VL-3B built from its configuration (real shapes, the tiny tokenizer),
16 prompts of 6 frames at 560x560, n=8, up to 1024 new tokens, one engine alone on the GPU. Prints one table:
engine start, generation (output tokens/s, prompt tokens/s, prefix-cache hit rate), weight sync seconds of the
full model (IPC with CUDA, reload on CPU), engine restart seconds, and HF generate on a few of the same prompts
(`--hf-prompts` prompts, `--hf-max-new-tokens` tokens: HF at full size does not fit one 10-minute call), with
the ratio of the two output rates.

Prefix-cache hit rate: prompt tokens served from vLLM's prefix cache / prompt tokens looked up, over every
request of the timed call (each of the n samples counts its prompt; the prefill-first warm-up counts too).
Ceiling: n / (n + 1) with prefill-first (88.9% at n=8), (n - 1) / n without. The sampling pass alone (warm-up
excluded) is printed too: its ceiling is ~100% with prefill-first.

    python benchmarks/rollout.py                 # GPU, 3B shapes
    python benchmarks/rollout.py --tiny          # CPU check: tiny model, 4 prompts x 2 frames at 112, n=2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

for _key, _value in {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}.items():
    os.environ.setdefault(_key, _value)

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from actors.rollout_pool import RolloutPool  # noqa: E402
from actors.weight_sync import make_transport  # noqa: E402
from veason_ray.config import RolloutConfig, SamplingConfig  # noqa: E402
from veason_ray.records import PromptGroup, Sample  # noqa: E402


def write_random_3b(out_dir: Path) -> Path:
    """Qwen2.5-VL-3B-Instruct's shapes (config.json of the release), random init, with the tiny tokenizer."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from veason_ray.models.tiny_qwen import build_tiny_processor, qwen2_5_vl_config

    processor = build_tiny_processor()
    config = qwen2_5_vl_config(
        processor.tokenizer,
        text_sizes={
            "vocab_size": 151936,
            "hidden_size": 2048,
            "intermediate_size": 11008,
            "num_hidden_layers": 36,
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [16, 24, 24],
            },
        },
        vision_sizes={
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 2048,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
        },
    )
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = [config.text_config.eos_token_id]
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # vLLM checks free memory against gpu_memory_utilization at start
    return out_dir


def make_groups(count: int, frames: int, size: int) -> list[PromptGroup]:
    rng = np.random.default_rng(0)
    groups = []
    for g in range(count):
        sample = Sample(
            dataset="benchmark", split="train", video=f"v{g}", exp_id="0",
            expression="the person who is about to open the door", type_id=1, obj_ids=(1,),
            frame_indices=tuple(range(0, 5 * frames, 5)), keyframe=0,
            frames=rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8),
            gt_masks_560=np.zeros((frames, 1, 1), dtype=bool), gt_boxes_560=[np.zeros((1, 4))] * frames,
            original_size=(size, size), num_video_frames=5 * frames,
        )  # fmt: skip
        groups.append(PromptGroup(group_id=g, sample=sample))
    return groups


def hf_generate(model_dir: Path, groups: list[PromptGroup], n: int, max_new_tokens: int) -> dict[str, float]:
    """Plain HF generate: all `groups` in one batch, n samples each (num_return_sequences), exactly
    `max_new_tokens` new tokens per sample (min_new_tokens, as random vLLM weights never stop either)."""
    from veason_ray.models.hf_policy import HFPolicy
    from veason_ray.models.loading import load_policy

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = load_policy(str(model_dir), dtype="bfloat16", device=device)
    policy = HFPolicy(model, processor)
    pad = processor.tokenizer.pad_token_id
    inputs = policy.encode([g.sample.messages() for g in groups])
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=1.0,
            num_return_sequences=n,
        )
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    out_tokens = int((output[:, inputs["input_ids"].shape[1] :] != pad).sum())
    prompt_tokens = int(inputs["attention_mask"].sum()) * n
    del model
    return {"seconds": seconds, "output_tok_s": out_tokens / seconds, "prompt_tok_s": prompt_tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny model and sizes (CPU check)")
    parser.add_argument("--model", default="", help="a Qwen2.5-VL folder (default: random 3B / tiny)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--size", type=int, default=560)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--engines", type=int, default=1)
    parser.add_argument("--gpus-per-engine", type=float, default=1.0)
    parser.add_argument(
        "--gpu-memory-utilization", type=float, default=0.85, help="0.85: the pool alone on the GPU"
    )
    parser.add_argument("--bucket-mb", type=float, default=1024)
    parser.add_argument(
        "--engine-core-process", choices=["auto", "inproc", "separate"], default="auto",
        help="auto: inproc on CPU, separate with CUDA",
    )  # fmt: skip
    parser.add_argument("--no-prefill-first", action="store_true", help="schedule the n samples at once")
    parser.add_argument(
        "--seed-requests", action="store_true", help="per-request seeds (reproducible, slower)"
    )
    parser.add_argument("--suppress-vision", action="store_true", help="logit_bias against vision tokens")
    parser.add_argument("--hf-prompts", type=int, default=2, help="prompts HF generate runs (0: skip HF)")
    parser.add_argument("--hf-max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    if args.tiny:
        args.prompts, args.frames, args.size, args.n, args.max_new_tokens = 4, 2, 112, 2, 16
        args.hf_max_new_tokens = min(args.hf_max_new_tokens, 16)
    on_gpu = torch.cuda.is_available()

    work = Path(tempfile.mkdtemp(prefix="rollout_bench_"))
    if args.model:
        model_dir = Path(args.model)
    elif args.tiny:
        from veason_ray.models.tiny_qwen import write_tiny_qwen

        model_dir = write_tiny_qwen(work / "tiny")
    else:
        model_dir = write_random_3b(work / "random_3b")
    groups = make_groups(args.prompts, args.frames, args.size)
    cfg = RolloutConfig(
        engines=args.engines,
        gpus_per_engine=args.gpus_per_engine,
        gpu_memory_utilization=args.gpu_memory_utilization,
        n=args.n,
        enforce_eager=args.tiny,
        max_model_len=8192 if not args.tiny else 2048,
        max_images_per_prompt=args.frames,
        sampling=SamplingConfig(max_new_tokens=args.max_new_tokens),
        suppress_vision_tokens=args.suppress_vision,
        engine_core_process=args.engine_core_process,
        prefill_first=not args.no_prefill_first,
        seed_requests=args.seed_requests,
    )
    ray.init(num_gpus=None if on_gpu else 1, include_dashboard=False, log_to_driver=False)
    rows: list[tuple[str, str]] = []
    try:
        pool = RolloutPool(str(model_dir), cfg, seed=0)
        core = pool.engine_info[0]["engine_core"]
        rows.append(
            (f"engine start (s, slowest engine; engine core {core})",
             f"{max(i['start_seconds'] for i in pool.engine_info):.1f}")
        )  # fmt: skip
        pool.generate(groups[:1], n=1)  # warm-up
        start = time.perf_counter()
        out = pool.generate(groups)
        seconds = time.perf_counter() - start
        stats = ray.get([e.prefix_cache_stats.remote() for e in pool.engines])
        out_tokens = sum(len(r.token_ids) for g in out for r in g)
        prompt_tokens = sum(g[0].prompt_token_count for g in out) * args.n  # every sample's prompt
        vllm_tok_s = out_tokens / seconds
        total = {k: sum(s[k] for s in stats) for k in stats[0]}
        hit_all = (total["cached_tokens"] + total["warmup_cached_tokens"]) / max(
            1, total["prompt_tokens"] + total["warmup_prompt_tokens"]
        )
        hit_samples = total["cached_tokens"] / max(1, total["prompt_tokens"])
        rows += [
            ("vLLM generate (s)", f"{seconds:.2f}"),
            ("vLLM output tokens/s", f"{vllm_tok_s:,.0f}"),
            ("vLLM prompt tokens/s (n x prompt tokens)", f"{prompt_tokens / seconds:,.0f}"),
            (f"prefix-cache hit, whole call (ceiling {args.n}/{args.n + 1} prefill-first)", f"{hit_all:.1%}"),
            ("prefix-cache hit, sampling pass only", f"{hit_samples:.1%}"),
        ]
        from transformers import Qwen2_5_VLForConditionalGeneration

        learner = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16)
        if on_gpu:
            learner = learner.cuda()
        transport = make_transport("auto", int(args.bucket_mb * 2**20))
        report = pool.update_weights(transport, lambda: learner.state_dict().items())
        rows.append(
            (f"weight sync over {report.transport} (s, {report.nbytes / 2**30:.2f} GiB, {report.buckets} buckets)",
             f"{report.seconds:.2f}")
        )  # fmt: skip
        # the learner stays: a restarted engine is re-synced by replaying the transport's source
        rows.append(("engine restart incl. re-sync (s)", f"{pool.restart(0):.1f}"))
        pool.shutdown()
    except Exception:
        if rows:
            print_rows(rows, args, on_gpu)  # what was measured before the failure
        raise
    finally:
        ray.shutdown()
    if args.hf_prompts > 0:
        k, m = min(args.hf_prompts, len(groups)), args.hf_max_new_tokens
        hf = hf_generate(model_dir, groups[:k], args.n, m)
        rows += [
            (f"HF generate (s; {k} prompts x n={args.n} in one batch x {m} tokens)", f"{hf['seconds']:.2f}"),
            ("HF output tokens/s (at that smaller scale)", f"{hf['output_tok_s']:,.0f}"),
            ("HF prompt tokens/s", f"{hf['prompt_tok_s']:,.0f}"),
            ("ratio vLLM / HF output tokens/s", f"{vllm_tok_s / hf['output_tok_s']:.1f}x"),
        ]
    print_rows(rows, args, on_gpu)


def print_rows(rows: list[tuple[str, str]], args: argparse.Namespace, on_gpu: bool) -> None:
    device = torch.cuda.get_device_name() if on_gpu else "CPU"
    print(f"\nrollout benchmark on {device}: {args.prompts} prompts x {args.frames} frames at {args.size} px, "
          f"n={args.n}, up to {args.max_new_tokens} new tokens, {args.engines} engine(s)")  # fmt: skip
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value:>12}")


if __name__ == "__main__":
    main()
