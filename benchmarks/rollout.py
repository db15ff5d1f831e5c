"""Rollout pool benchmark: our vLLM pool against bare vLLM and Hugging Face generate, on the same prompts.

Default (GPU): a random-init Qwen2.5-VL-3B built from its configuration (real shapes, the tiny tokenizer),
16 prompts of 6 frames at 560x560, n=8, up to 1024 new tokens, one engine alone on the GPU. One call, in order:

  1. HF generate on a few of the same prompts (`--hf-prompts`, `--hf-max-new-tokens`: HF at full size does not
     fit one 10-minute call), while the GPU is still empty; its ratio to our pool is printed at the end.
  2. bare vLLM in a subprocess (its GPU memory is free once it exits): vLLM's `LLM` built from the pool's own
     engine arguments (`engine_args`), on the same prompts (`group_prompt`) with the same SamplingParams
     (`rollout_sampling_params`); only `llm.generate` is timed. Then (`--bare-passes`) vLLM's per-token Logprob
     dicts with detokenization (what the pool asked for before), and no log-probs at all. Its torch.compile
     cache is the one the pool's engines start from.
  3. our pool with the configs' defaults: start, the timed `pool.generate`, the ratio to bare vLLM, and where
     the pool's seconds went (prefill-first pass, vLLM's generate, conversion to Rollouts, the rest: Ray).
  4. weight sync of the full model from a learner copy on the same GPU (IPC; reload on CPU), twice: the first
     push also initialises vLLM's transfer engine, the second is what every GRPO step pays.
  5. engine restarts with re-sync, each split into stop / start / re-sync and followed by the start-up lines
     vLLM logged meanwhile (weights loaded, torch.compile, profiling, KV cache, CUDA graphs): its engine core
     killed while the actor lives (SIGKILL of the separate engine-core process, as a CUDA error kills it; on
     CPU, where the engine core runs in the actor, its vLLM aborted), which the next generate finds and
     restarts in place; then a restart as a new actor.
  6. the pool with prefill-first flipped, if `--budget-s` leaves the time.

Prefix-cache hit rate: prompt tokens served from vLLM's prefix cache / prompt tokens looked up, over every
request of the timed call (each of the n samples counts its prompt; the prefill-first warm-up counts too).
Ceiling: n / (n + 1) with prefill-first (88.9% at n=8), (n - 1) / n without. `gpu_memory_utilization` (default:
computed) leaves room for the learner copy and two IPC buckets beside the engine, at most 0.75. Every line carries
the seconds since start; each row prints as soon as it is measured, the whole table at the end.

    python benchmarks/rollout.py                 # GPU, 3B shapes
    python benchmarks/rollout.py --tiny          # CPU check: tiny model, 4 prompts x 2 frames at 112, n=2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _key, _value in {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}.items():
    os.environ.setdefault(_key, _value)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from veason_ray.config import RolloutConfig, SamplingConfig  # noqa: E402
from veason_ray.records import ExpressionRecord, PromptGroup, Sample  # noqa: E402

MAX_UTILIZATION = 0.75  # the engine's share of the GPU when the learner's copy shares it
# CUDA contexts, allocator slack, the engine's memory beyond its fraction (2.1 GiB measured at 0.85)
MEMORY_MARGIN = 4 * 2**30
# vLLM's start-up lines (0.26 and 0.32) that say where an engine start goes, printed after each restart
STARTUP_LOG_MARKERS = (
    "Starting to load model",
    "Loading weights took",
    "Model loading took",
    "Dynamo bytecode transform",
    "Directly load the compiled graph",
    "Compiling a graph for",
    "torch.compile took",
    "Initial profiling/warmup run took",
    "Memory profiling takes",
    "Available KV cache memory",
    "Graph capturing finished in",
    "init engine (profile, create kv cache, warmup model) took",
    "warmup completed in",
)
STARTUP_LOG_LINES = 25  # at most, per restart
# Before anything is timed, a fresh engine runs the timed batch for a few tokens (on CPU the first large batch
# took 4x as long as the next: first-use costs that are no engine's steady state); caches are reset after it.
WARM_UP = SamplingConfig(max_new_tokens=16)


class Table:
    """Timestamped progress lines and result rows; a row prints the moment it is known."""

    def __init__(self, t0: float, prefix: str = "", budget_s: float = math.inf) -> None:
        self.t0, self.prefix, self.budget_s = t0, prefix, budget_s
        self.rows: list[tuple[str, str]] = []

    def left(self) -> float:
        """Seconds of the wall budget left."""
        return self.budget_s - (time.time() - self.t0)

    def log(self, message: str) -> None:
        print(f"[{time.time() - self.t0:6.1f} s] {self.prefix}{message}", flush=True)

    def add(self, key: str, value: str) -> None:
        self.rows.append((key, value))
        self.log(f"ROW {key}: {value}")

    def print(self, title: str) -> None:
        width = max((len(k) for k, _ in self.rows), default=0)
        print(f"\n{title}", flush=True)
        for key, value in self.rows:
            print(f"  {key:<{width}}  {value:>14}", flush=True)


def write_random_3b(out_dir: Path) -> Path:
    """Qwen2.5-VL-3B-Instruct's shapes (config.json of the release), random init in bf16, the tiny tokenizer."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from veason_ray.models.tiny_qwen import build_tiny_processor, qwen2_5_vl_config

    processor = build_tiny_processor()
    config = qwen2_5_vl_config(
        processor.tokenizer,
        text_sizes={
            "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
            "num_attention_heads": 16, "num_key_value_heads": 2, "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        },
        vision_sizes={
            "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 2048,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "tokens_per_second": 2,
            "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
        },
    )  # fmt: skip
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # no fp32 copy of 3.75 B parameters on the way
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.generation_config.eos_token_id = [config.text_config.eos_token_id]
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # vLLM checks free memory against gpu_memory_utilization at start
    return out_dir


def write_random_3b_in_child(out_dir: Path) -> Path:
    """`write_random_3b` in a spawned process: it builds the model on the GPU, and its CUDA context and cached
    blocks must be gone before engines and learners measure free memory."""
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(target=write_random_3b, args=(out_dir,))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"writing the random 3B policy failed (exit code {child.exitcode})")
    return out_dir


# "Realistic" response lengths (issue 27): a trained policy stops at 100-400 tokens, unevenly. Modelled as no
# response shorter than REALISTIC_MIN_TOKENS, then a geometric number of tokens of mean REALISTIC_MEAN_EXTRA_TOKENS
# (mean ~250, 90% under ~450).
REALISTIC_MIN_TOKENS = 100
REALISTIC_MEAN_EXTRA_TOKENS = 150


def realistic_lengths(rng: np.random.Generator, count: int, cap: int) -> list[int]:
    """`count` response lengths of the realistic spread, at most `cap`."""
    extra = rng.geometric(1 / REALISTIC_MEAN_EXTRA_TOKENS, count) - 1
    return np.minimum(REALISTIC_MIN_TOKENS + extra, cap).tolist()


def make_groups(count: int, frames: int, size: int) -> list[PromptGroup]:
    rng = np.random.default_rng(0)
    groups = []
    for g in range(count):
        record = ExpressionRecord(
            "benchmark", "train", f"v{g}", "0", "the person who is about to open the door", 1, (1,), ("1",)
        )
        sample = Sample(
            record=record, frame_indices=tuple(range(0, 5 * frames, 5)), keyframe=0,
            frames=rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8),
            gt_masks_560=np.zeros((frames, 1, 1), dtype=bool), gt_boxes_560=[np.zeros((1, 4))] * frames,
            original_size=(size, size), num_video_frames=5 * frames,
        )  # fmt: skip
        groups.append(PromptGroup(group_id=g, sample=sample))
    return groups


def checkpoint_weights(model_dir: Path, device: str) -> list[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors on `device`: the learner's copy of the weights (the names vLLM loads)."""
    from safetensors.torch import load_file

    return [
        item for f in sorted(model_dir.glob("*.safetensors")) for item in load_file(f, device=device).items()
    ]


def engine_memory_fraction(model_bytes: int, bucket_bytes: int) -> float:
    """The engine's gpu_memory_utilization that leaves the learner's copy, the two IPC ring buffers and a
    margin free on this GPU, in steps of 0.05, at most MAX_UTILIZATION."""
    total = torch.cuda.mem_get_info()[1]
    fraction = (total - model_bytes - 2 * bucket_bytes - MEMORY_MARGIN) / total
    return min(MAX_UTILIZATION, math.floor(fraction * 20) / 20)


def rollout_config(args: argparse.Namespace) -> RolloutConfig:
    return RolloutConfig(
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
        prefill_first=args.prefill_first,
        seed_requests=args.seed_requests,
        weight_transport=args.transport,
    )


def rate_rows(table: Table, label: str, seconds: float, out_tokens: int, prompt_tokens: int) -> float:
    table.add(f"{label}: generate s", f"{seconds:.2f}")
    table.add(f"{label}: output tokens/s", f"{out_tokens / seconds:,.0f}")
    table.add(f"{label}: prompt tokens/s (n x prompt tokens)", f"{prompt_tokens / seconds:,.0f}")
    return out_tokens / seconds


# ---- 1. bare vLLM (runs in a subprocess: `--bare-worker RESULT_JSON`) ----


def bare_vllm(args: argparse.Namespace, table: Table) -> None:
    """vLLM's `LLM` alone: the pool's engine arguments, prompts and SamplingParams; results to a JSON file."""
    from actors.rollout import (
        apply_engine_env,
        engine_args,
        group_prompt,
        prefix_counters,
        reset_engine_caches,
        rollout_sampling_params,
    )

    cfg, on_gpu = rollout_config(args), torch.cuda.is_available()
    apply_engine_env(cfg, on_gpu)  # the pool's process model
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(**engine_args(args.model, cfg, on_gpu, seed=0))
    table.add("bare vLLM: engine start s (the call's first engine)", f"{time.perf_counter() - start:.1f}")
    processor = AutoProcessor.from_pretrained(args.model)
    prompts = [group_prompt(processor, g) for g in make_groups(args.prompts, args.frames, args.size)]
    llm.generate(prompts, rollout_sampling_params(WARM_UP, args.n), use_tqdm=False)
    s = cfg.sampling
    passes = {
        "bare vLLM, the pool's SamplingParams": rollout_sampling_params(s, args.n),
        "bare vLLM, Logprob dicts + detokenized": SamplingParams(
            n=args.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens, logprobs=0
        ),
        "bare vLLM, no log-probs": SamplingParams(
            n=args.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens
        ),
    }
    rate = None
    for label, params in list(passes.items())[: args.bare_passes]:
        reset_engine_caches(llm)
        before = prefix_counters(llm)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        after = prefix_counters(llm)
        out_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs) * args.n
        tok_s = rate_rows(table, label, seconds, out_tokens, prompt_tokens)
        rate = rate or tok_s  # the first pass: the pool's SamplingParams
        table.add(
            f"{label}: prefix-cache hit", f"{(after[1] - before[1]) / max(1, after[0] - before[0]):.1%}"
        )
        # what a timeout leaves is kept
        Path(args.bare_worker).write_text(json.dumps({"rows": table.rows, "rate": rate}))
    llm.llm_engine.engine_core.shutdown()


def run_bare(args: argparse.Namespace, table: Table, work: Path) -> float | None:
    """Run `bare_vllm` in a subprocess (its own session: a timeout kills its engine core too); its rows join
    the table. Returns its output tokens/s with the pool's SamplingParams."""
    result_path = work / "bare.json"
    command = [sys.executable, __file__, *sys.argv[1:], "--model", args.model, "--bare-worker", str(result_path),
               "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--t0", str(table.t0)]  # fmt: skip
    path = os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))
    process = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": path}, start_new_session=True)
    try:
        process.wait(timeout=args.bare_timeout_s)
    except subprocess.TimeoutExpired:
        table.log(f"bare vLLM passed --bare-timeout-s {args.bare_timeout_s}; killed")
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    if process.returncode:
        table.log(f"bare vLLM exited with {process.returncode}")
    result = json.loads(result_path.read_text()) if result_path.exists() else {"rows": [], "rate": None}
    table.rows += [tuple(row) for row in result["rows"]]
    wait_for_free_gpu(args.gpu_memory_utilization, table)
    return result["rate"]


def wait_for_free_gpu(fraction: float, table: Table, timeout_s: float = 60.0) -> None:
    """Until `fraction` of the GPU (+ 5%) is free again: an exiting engine core gives its memory back late."""
    if not torch.cuda.is_available():
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        free, total = torch.cuda.mem_get_info()
        if free / total >= fraction + 0.05:
            return
        time.sleep(1.0)
    table.log(f"GPU still {1 - free / total:.0%} used after {timeout_s:.0f} s; going on")


# ---- 2.-5. our pool ----


def pool_pass(pool, groups: list[PromptGroup], label: str, table: Table, n: int) -> tuple[float, float]:
    """One timed `pool.generate` on fresh caches; its rows; returns (seconds, output tokens/s)."""
    import ray

    ray.get([e.reset_caches.remote() for e in pool.engines])
    start = time.perf_counter()
    out = pool.generate(groups)
    seconds = time.perf_counter() - start
    stats = ray.get([e.last_generate_stats.remote() for e in pool.engines])
    total = {k: sum(s[k] for s in stats) for k in stats[0]}
    out_tokens = sum(len(r.token_ids) for g in out for r in g)
    prompt_tokens = sum(g[0].prompt_token_count for g in out) * n  # every sample's prompt
    rate = rate_rows(table, label, seconds, out_tokens, prompt_tokens)
    looked_up = total["prompt_tokens"] + total["warmup_prompt_tokens"]
    hit = (total["cached_tokens"] + total["warmup_cached_tokens"]) / max(1, looked_up)
    table.add(f"{label}: prefix-cache hit, whole call", f"{hit:.1%}")
    table.add(
        f"{label}: prefix-cache hit, sampling pass",
        f"{total['cached_tokens'] / max(1, total['prompt_tokens']):.1%}",
    )
    parts = ("warmup_seconds", "generate_seconds", "convert_seconds")
    rest = seconds - max(sum(s[p] for p in parts) for s in stats)
    table.add(f"{label}: s in prefill-first / vLLM generate / to Rollouts / rest (Ray, prompts)",
              " / ".join(f"{max(s[p] for s in stats):.2f}" for p in parts) + f" / {rest:.2f}")  # fmt: skip
    return seconds, rate


def sync_phase_row(table: Table, report) -> None:
    """Where one push's seconds went, when the transport reports it (IPC: init, start, pack, wait, finish)."""
    if report.phases:
        table.add(
            f"  of it: {' / '.join(report.phases)} s", " / ".join(f"{v:.3f}" for v in report.phases.values())
        )


class WorkerLogs:
    """The lines Ray's worker processes logged under the session's `logs` folder (`worker-*.out` and
    `worker-*.err`; a separate engine core writes to its actor's files) since the last `mark`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.sizes: dict[Path, int] = {}
        self.since = ""  # the mark's local time as vLLM stamps its lines ("MM-DD HH:MM:SS")

    def _files(self) -> list[Path]:
        return sorted([*self.folder.glob("worker-*.out"), *self.folder.glob("worker-*.err")])

    def mark(self) -> None:
        self.sizes = {f: f.stat().st_size for f in self._files()}
        self.since = time.strftime("%m-%d %H:%M:%S")

    def lines_since_mark(self, markers: tuple[str, ...]) -> list[str]:
        """The lines appended since the mark that hold any of `markers`, in time order, as "HH:MM:SS message".
        Lines stamped before the mark are left out: a process may flush its output late."""
        found = []
        for path in self._files():
            with path.open("rb") as file:
                file.seek(self.sizes.get(path, 0))
                text = file.read().decode(errors="replace")
            for line in text.splitlines():
                stamp = re.search(r"(\d\d-\d\d (\d\d:\d\d:\d\d))(?:\.\d+)? \[[^\]]+\] (.*)", line)
                if any(m in line for m in markers) and (not stamp or stamp[1] >= self.since):
                    found.append((stamp[1], f"{stamp[2]} {stamp[3]}") if stamp else ("", line.strip()[-200:]))
        return [line for _, line in sorted(found)]


def restart_rows(pool, table: Table, logs: WorkerLogs) -> None:
    """The last restart: its kind and split (old vLLM stopped, new one started and how it loaded, weights
    replayed), then vLLM's start-up lines logged since `logs.mark()`."""
    split, info = pool.last_restart, pool.engine_info[0]
    fallback = f"; fell back: {split.fallback}" if split.fallback else ""
    table.add(
        f"  of it ({split.kind}{fallback}): stop / start ({info['weights']}; vLLM's own start "
        f"{split.engine_start:.1f}) / re-sync s",
        f"{split.stop:.1f} / {split.start:.1f} / {split.resync:.2f}",
    )
    lines = logs.lines_since_mark(STARTUP_LOG_MARKERS)
    for line in lines[:STARTUP_LOG_LINES]:
        table.log(f"    vLLM: {line}")
    if len(lines) > STARTUP_LOG_LINES:
        table.log(f"    vLLM: ... {len(lines) - STARTUP_LOG_LINES} more start-up lines in {logs.folder}")


def kill_engine_core(pool, engine: int) -> str:
    """Kill engine `engine`'s vLLM while its actor lives: SIGKILL of a separate engine-core process (what a CUDA
    error does to it); an in-process engine core (CPU) cannot die alone, so its vLLM is aborted instead."""
    import ray

    info = pool.engine_info[engine]
    if info["engine_core"] == "separate":
        os.kill(info["engine_core_pid"], signal.SIGKILL)
        return "engine core process killed"
    ray.get(pool.engines[engine].abort_engine.remote("benchmark: engine core killed"))
    return "in-process vLLM aborted"


def restart_both_ways(pool, table: Table, groups: list[PromptGroup], logs: WorkerLogs) -> None:
    """A dead engine core found by the next generate and restarted in place, then a restart as a new actor;
    each with its split and vLLM's start-up lines."""
    logs.mark()
    how = kill_engine_core(pool, 0)
    start = time.perf_counter()
    out = pool.generate(groups[:2], WARM_UP)
    table.add(
        f"{how}: next generate (2 prompts x n, 16 tokens) incl. its restart s",
        f"{time.perf_counter() - start:.1f} ({sum(len(r.token_ids) for g in out for r in g)} tokens)",
    )
    table.add("engine restart in place incl. re-sync s", f"{pool.last_restart.seconds:.1f}")
    restart_rows(pool, table, logs)
    logs.mark()
    table.add("engine restart as a new actor incl. re-sync s", f"{pool.restart(0, in_place=False):.1f}")
    restart_rows(pool, table, logs)
    start = time.perf_counter()
    out = pool.generate(groups[:2], WARM_UP)
    table.add(
        "new actor: 2 prompts x n, 16 tokens s",
        f"{time.perf_counter() - start:.2f} ({sum(len(r.token_ids) for g in out for r in g)} tokens)",
    )


def sync_and_restart(
    pool, args: argparse.Namespace, table: Table, groups: list[PromptGroup], logs: WorkerLogs
) -> None:
    """`--sync-only`: pushes of the full model at each `--sync-bucket-mb` size (`--sync-pushes` each, after one
    push that initialises the transfer), their phase split, then both restarts (`restart_both_ways`)."""
    from actors.weight_sync import make_transport

    nccl = args.transport == "nccl"
    # NCCL: the learner's copy on the last GPU, the engine on GPU 0 (Ray is told of one GPU: `run_pool`)
    device = (
        f"cuda:{torch.cuda.device_count() - 1}" if nccl else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    weights = checkpoint_weights(Path(args.model), device)  # the NCCL transport sends from the weights' GPU
    sizes = [float(mb) for mb in args.sync_bucket_mb.split(",")]
    transport = make_transport(args.transport, int(sizes[0] * 2**20))
    report = pool.update_weights(transport, lambda: weights)
    table.add(
        f"weight sync, first push (transfer init incl.; {sizes[0]:g} MiB buckets) s", f"{report.seconds:.2f}"
    )
    for mb in sizes:
        transport.bucket_bytes = int(mb * 2**20)
        seconds = []
        for _ in range(args.sync_pushes):
            report = pool.update_weights(transport, lambda: weights)
            seconds.append(report.seconds)
        table.add(
            f"weight sync over {report.transport}, {report.nbytes / 2**30:.2f} GiB in {report.buckets} x {mb:g} MiB "
            f"buckets: best / median of {len(seconds)} s",
            f"{min(seconds):.3f} / {sorted(seconds)[len(seconds) // 2]:.3f}",
        )
        sync_phase_row(table, report)
    if not transport.restart_in_place_supported:  # NCCL: a new actor regroups, not measured here (issue 10)
        table.log(
            f"{report.transport} transport: restarts not measured (its engines restart as new actors only)"
        )
        return
    restart_both_ways(pool, table, groups, logs)


def run_pool(args: argparse.Namespace, table: Table, bare_rate: float | None) -> float:
    """Steps 2-5; returns the pool's output tokens/s."""
    import ray

    from actors.rollout_pool import RolloutPool
    from actors.weight_sync import make_transport

    on_gpu = torch.cuda.is_available()
    cfg = rollout_config(args)
    groups = make_groups(args.prompts, args.frames, args.size)
    label = "our pool" + (", prefill-first" if args.prefill_first else ", no prefill-first")
    if args.transport == "nccl" and (not on_gpu or torch.cuda.device_count() < 2):
        raise SystemExit(
            "rollout benchmark: --transport nccl needs two GPUs (engine on GPU 0, learner on the last)"
        )
    gpus = 1 if args.transport == "nccl" or not on_gpu else None  # nccl: Ray places the engine on GPU 0
    context = ray.init(num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    # this session's logs: session_latest may be another Ray instance's on a shared machine
    logs = WorkerLogs(Path(context.address_info["session_dir"]) / "logs")
    try:
        pool = RolloutPool(args.model, cfg, seed=0)
        info = pool.engine_info[0]
        cache = "compile cache of the bare engine" if bare_rate else "the call's first engine"
        table.add(f"our pool: engine start s (engine core {info['engine_core']}, {cache})",
                  f"{max(i['start_seconds'] for i in pool.engine_info):.1f}")  # fmt: skip
        if args.sync_only:
            sync_and_restart(pool, args, table, groups, logs)
            return 0.0
        pool.generate(groups, WARM_UP)
        seconds, rate = pool_pass(pool, groups, label, table, args.n)
        if bare_rate:
            table.add(
                f"{label} / bare vLLM (same SamplingParams), output tokens/s",
                f"{rate / bare_rate:.2f}x",
            )
        weights = checkpoint_weights(Path(args.model), "cuda" if on_gpu else "cpu")
        transport = make_transport("auto", int(args.bucket_mb * 2**20))
        for push in ("first push, transfer init incl.", "second push"):
            report = pool.update_weights(transport, lambda: weights)
            table.add(f"weight sync over {report.transport} ({push}; {report.nbytes / 2**30:.2f} GiB, "
                      f"{report.buckets} buckets) s", f"{report.seconds:.2f}")  # fmt: skip
            sync_phase_row(table, report)
        restart_both_ways(pool, table, groups, logs)
        if args.skip_prefill_ab or table.left() < 1.5 * seconds + 30:
            table.log("prefill-first flipped: skipped (--skip-prefill-ab or --budget-s)")
        else:
            pool.generate(groups, WARM_UP)  # the restarted engine
            pool.cfg.prefill_first = not pool.cfg.prefill_first
            other = "our pool, " + ("prefill-first" if pool.cfg.prefill_first else "no prefill-first")
            pool_pass(pool, groups, other, table, args.n)
        pool.shutdown()
    finally:
        ray.shutdown()
    return rate


def hf_generate(args: argparse.Namespace, table: Table) -> float:
    """Plain HF generate on the first `--hf-prompts` prompts, in one batch, n samples each
    (num_return_sequences), exactly `--hf-max-new-tokens` tokens per sample (min_new_tokens, as random vLLM
    weights never stop either); its rows. Returns its output tokens/s. Runs while the GPU is still empty."""
    from veason_ray.models.hf_policy import HFPolicy
    from veason_ray.models.loading import load_policy

    device = "cuda" if torch.cuda.is_available() else "cpu"
    k, m = min(args.hf_prompts, args.prompts), args.hf_max_new_tokens
    model, processor = load_policy(args.model, dtype="bfloat16", device=device)
    inputs = HFPolicy(model, processor).encode(
        [g.sample.messages() for g in make_groups(k, args.frames, args.size)]
    )
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            **inputs,
            max_new_tokens=m,
            min_new_tokens=m,
            do_sample=True,
            temperature=1.0,
            num_return_sequences=args.n,
        )
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    out_tokens = int((output[:, inputs["input_ids"].shape[1] :] != processor.tokenizer.pad_token_id).sum())
    del model, output, inputs
    if device == "cuda":
        torch.cuda.empty_cache()
    table.add(f"HF generate s ({k} prompts x n={args.n} in one batch x {m} tokens)", f"{seconds:.2f}")
    table.add("HF output tokens/s (at that smaller scale)", f"{out_tokens / seconds:,.0f}")
    return out_tokens / seconds


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--tiny", action="store_true", help="tiny model and sizes (CPU check)")
    add("--model", default="", help="a Qwen2.5-VL folder (default: random 3B / tiny)")
    add("--prompts", type=int, default=16)
    add("--frames", type=int, default=6)
    add("--size", type=int, default=560)
    add("--n", type=int, default=8)
    add("--max-new-tokens", type=int, default=1024)
    add("--engines", type=int, default=1)
    add("--gpus-per-engine", type=float, default=1.0)
    add("--gpu-memory-utilization", type=float, default=0.0, help="0: computed, room for the learner copy")
    add("--bucket-mb", type=float, default=1024)
    add("--engine-core-process", choices=["auto", "inproc", "separate"], default="auto",
        help="auto: inproc on CPU, separate with CUDA")  # fmt: skip
    add(
        "--prefill-first",
        action="store_true",
        help="each prompt once before its n samples (rollout.prefill_first)",
    )
    add("--seed-requests", action="store_true", help="per-request seeds (reproducible, slower)")
    add("--suppress-vision", action="store_true", help="logit_bias against vision tokens")
    add("--bare-passes", type=int, default=2, help="bare vLLM passes, 1-3 (0: no bare vLLM)")
    add("--bare-timeout-s", type=float, default=300)
    add("--skip-prefill-ab", action="store_true", help="no pool pass with prefill-first flipped")
    add(
        "--sync-only",
        action="store_true",
        help="our pool's weight sync and restart only (no generate passes)",
    )
    add("--sync-bucket-mb", default="256,512,1024", help="--sync-only: bucket sizes to push, comma-separated")
    add("--sync-pushes", type=int, default=3, help="--sync-only: timed pushes per bucket size")
    add("--transport", choices=["auto", "ipc", "nccl"], default="auto",
        help="weight transport; nccl (with --sync-only, 2 GPUs): the learner's copy on another GPU")  # fmt: skip
    add("--hf-prompts", type=int, default=2, help="prompts HF generate runs (0: skip HF)")
    add("--hf-max-new-tokens", type=int, default=128)
    add("--budget-s", type=float, default=520, help="optional steps run only while this wall budget allows")
    add("--bare-worker", default="", help=argparse.SUPPRESS)
    add("--t0", type=float, default=0.0, help=argparse.SUPPRESS)
    if "--tiny" in sys.argv:  # the tiny sizes, unless given explicitly
        parser.set_defaults(prompts=4, frames=2, size=112, n=2, max_new_tokens=16, hf_max_new_tokens=16)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.bare_worker:
        bare_vllm(args, Table(args.t0, "bare: "))
        return
    table = Table(time.time(), budget_s=args.budget_s)
    on_gpu = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp(prefix="rollout_bench_"))
    if not args.model:
        table.log("writing the random-init model")
        if args.tiny:
            from veason_ray.models.tiny_qwen import write_tiny_qwen

            args.model = str(write_tiny_qwen(work / "tiny"))
        else:
            args.model = str(write_random_3b(work / "random_3b"))
    model_bytes = sum(f.stat().st_size for f in Path(args.model).glob("*.safetensors"))
    if on_gpu and not args.gpu_memory_utilization:
        largest = max(
            [args.bucket_mb] + [float(mb) for mb in args.sync_bucket_mb.split(",")] * args.sync_only
        )
        args.gpu_memory_utilization = engine_memory_fraction(model_bytes, int(largest * 2**20))
    device = torch.cuda.get_device_name() if on_gpu else "CPU"
    title = (f"rollout benchmark on {device}: {args.prompts} prompts x {args.frames} frames at {args.size} px, "
             f"n={args.n}, up to {args.max_new_tokens} new tokens, {args.engines} engine(s), "
             f"gpu_memory_utilization {args.gpu_memory_utilization}, model {model_bytes / 2**30:.2f} GiB")  # fmt: skip
    table.log(title)
    try:
        hf_rate = hf_generate(args, table) if args.hf_prompts > 0 else None
        bare_rate = run_bare(args, table, work) if args.bare_passes > 0 else None
        rate = run_pool(args, table, bare_rate)
        if hf_rate and rate:
            table.add("ratio our pool / HF output tokens/s", f"{rate / hf_rate:.1f}x")
    finally:
        table.print(title)
        shutil.rmtree(work, ignore_errors=True)  # a written 3B model is 7 GiB


if __name__ == "__main__":
    main()
