"""Side by side with verl (issue 29): verl's own GRPO trainer on the work of benchmarks/grpo_step.py, on one GPU.

It launches verl's entry point, `python3 -m verl.trainer.main_ppo` (verl 0.9.1, staged by scripts/stage_verl.sh;
nothing of verl is in this repository), with Hydra overrides for the same work as benchmarks/grpo_step.py: the
random-init Qwen2.5-VL with the 3B shapes (the folder that run keeps with `--models-dir`, else written by
benchmarks/rollout.py's writer), 16 prompts x n=8 of `make_groups`' six 560x560 frames (the same prompts and
pixels, as verl's multimodal dataset: benchmarks/peer_verl_inputs.py), up to 1,024 new tokens, lr 1e-6, KL 5e-3
low_var_kl (k3) against a reference model, clip 0.2, entropy 1e-3, one optimizer step per step; verl's hybrid
engine (vLLM colocated, asleep while the learner runs) at our engine's 25% of GPU memory and vLLM batch limits;
FSDP with nothing offloaded (`--offload`); a reward file that scores 0. Its first step is the
untimed warm-up, then `--steps` timed steps; the seconds are verl's own (`timing_s/*` from its file logger).
`--trainer v0` (default) is RayPPOTrainer; `v1` is 0.9.1's default TransferQueue trainer.

What cannot be equal, and why:
- flash-attn: verl's FSDP recipes pack sequences through its varlen kernel (`use_remove_padding`). PyPI has only
  its source and no build fits a 10-minute call, so verl runs padded micro-batches under SDPA
  (`use_remove_padding=False`, `attn_implementation=sdpa`), as our learner does. Ours batches the vision windows
  (veason_ray/models/vision_window_attention.py); verl gets transformers' loop over them.
- Stopping: random weights never stop on our side (151,936 tokens to draw from); verl masks the logits past the
  tokenizer (~830 ids here), so <|im_end|> comes often: `ignore_eos=True` runs every response to 1,024 tokens.
- Rollout: verl sends vLLM's OpenAI server 128 requests of one sample; ours asks vLLM's LLM for 8 per prompt.
- A verl 0.9.1 bug this work meets: batches whose sequences all have one length break its nested 3-D position
  ids in the update (benchmarks/peer_verl_fixes.py says how); that module repairs them in verl's workers.
- Old log-probs: verl recomputes them in a pass of their own (`timing_s/old_log_prob`); ours, with one optimizer
  step a batch, are the update's own forward (ratio 1). `--bypass-old-logprob` gives verl the rollout's (its
  `rollout_correction.bypass_mode`).
- Images: each of a group's 8 sequences takes its 6 images through verl's vision tower; ours encodes them once.
- Memory: ours (ZeRO-2, optimizer offloaded) keeps bf16 parameters and a float32 gradient buffer on the GPU and
  steps Adam on the CPU. verl's FSDP worker holds float32 parameters and gradients and, for its optimizer step,
  brings its Adam states onto the GPU: 60 GB at 3.75 B parameters. Its reference model is forward-only, and verl's
  engine gives forward-only models FSDP's CPU offload whatever `param_offload` says: its bf16 parameters live in
  CPU memory and stream to the GPU at every forward (ours keeps the reference on the GPU). `--offload` says what
  else verl keeps in CPU memory between uses: `none` (default) nothing: on an 80 GB H100 its first step peaked
  at 76.2 GiB reserved by torch in its FSDP worker and its second ran (2026-12-07); `optimizer` the actor's Adam
  states; `recipe` the actor's parameters too, verl's one-GPU 3B recipe (examples/tuning/3b). On the lent
  machine (126 GB of RAM) Ray's memory monitor killed verl's FSDP worker with `recipe` in reference log-probs
  (95 GB resident) and with `optimizer` in its update (93.7 GB), both 2026-12-07. Update micro-batches of 2
  sequences (`--micro-batch`; ours: 8) and log-prob micro-batches of 2 (`--logprob-micro-batch`): at 8, verl's
  old log-probs asked for float32 logits of 8 x 3,655 tokens x 151,936 (16.6 GiB) with 69 GiB held and ran out of
  memory on an H100 (2026-12-06); an H200 has room for 8, which streams the reference's parameters a quarter as
  often.

    python3 benchmarks/peer_grpo_step.py --dry-run                   # here, CPU: dataset, reward file, command
    python3 benchmarks/peer_grpo_step.py --dry-run --verl-site DIR   # + verl's validated config and its own
                                                                     #   rendering of the prompt (verl in DIR)
    # GPU, from the repository root on PYTHONPATH, after ../shared/device/README.md's installs and
    # scripts/stage_verl.sh's install line; verl outlasts one device call, so scripts/gpu_chain.sh runs
    # it across calls (scripts/gpu_chains/verl_side_by_side.txt):
    python3 benchmarks/grpo_step.py --models-dir /tmp/bench_models --out /tmp/peer_grpo_step/ours.json
    python3 benchmarks/peer_grpo_step.py --model /tmp/bench_models/qwen2_5_vl_3b_random \
        --ours /tmp/peer_grpo_step/ours.json --out $OUT/verl.json
    python3 benchmarks/peer_grpo_step.py ... actor_rollout_ref.actor.strategy=fsdp2   # trailing: verl overrides
    python3 benchmarks/peer_grpo_step.py --compare verl.json --ours ours.json      # the tables again, side by side
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.grpo_step import EASYR1_TOKENS_PER_S_PER_GPU, T0, MemoryMonitor, say
from benchmarks.peer_verl_inputs import check_with_verl, write_inputs
from benchmarks.peer_verl_probe import PROBE_DIR_ENV, read_probes, short, summary_lines, task_spans
from benchmarks.process_memory import ProcessMemory, memory_table
from benchmarks.rollout import STARTUP_LOG_MARKERS, write_random_3b_in_child
from veason_ray.training.sequences import round_up

VERL_VERSION = "0.9.1"
REPO = Path(__file__).resolve().parents[1]
FIXES = REPO / "benchmarks" / "peer_verl_fixes.py"  # run in verl's workers: its docstring says why
PROBE = REPO / "benchmarks" / "peer_verl_probe.py"  # verl's workers' setup hook: the fixes, a stack sampler
POLICY_DIRNAME = "qwen2_5_vl_3b_random"  # benchmarks/grpo_step.py's folder under --models-dir
STAGES = (  # verl's timers in step order (ray_trainer.fit)
    ("generation (rollout, rewards, engine sleep)", "timing_s/gen"),
    ("reward (collect)", "timing_s/reward"),
    ("old log-probs (policy forward)", "timing_s/old_log_prob"),
    ("reference log-probs", "timing_s/ref"),
    ("advantages", "timing_s/adv"),
    ("actor update (offload in/out, fwd + bwd, AdamW)", "timing_s/update_actor"),
    ("weight sync (engine wake, push)", "timing_s/update_weights"),
)
SHOWN = ("Traceback", "Error", "error:", "out of memory", *STARTUP_LOG_MARKERS)  # verl output lines echoed


def verl_overrides(args: argparse.Namespace, work: Path, max_prompt: int) -> list[str]:
    """main_ppo's Hydra overrides for the work of benchmarks/grpo_step.py (a leading `+` on a key adds it to a
    section that lacks it); the trailing CLI ones come last."""
    data = work / "train.parquet"
    sections: dict[str, dict[str, object]] = {
        "algorithm": {"adv_estimator": "grpo", "use_kl_in_reward": False},
        "data": {
            "train_files": data, "val_files": data, "train_batch_size": args.prompts, "shuffle": False,
            "max_prompt_length": max_prompt, "max_response_length": args.max_new_tokens,
            "filter_overlong_prompts": False, "truncation": "error", "image_key": "images",
            "dataloader_num_workers": 2,  # of verl's 8: 16 rows a step; its offloaded states fill CPU memory
        },
        "actor_rollout_ref.model": {
            "path": args.model, "use_remove_padding": False, "enable_gradient_checkpointing": True,
            "+override_config.attn_implementation": "sdpa",
        },
        "actor_rollout_ref.actor": {
            "optim.lr": 1e-6, "ppo_mini_batch_size": args.prompts, "ppo_epochs": 1, "clip_ratio": 0.2,
            "ppo_micro_batch_size_per_gpu": args.micro_batch, "entropy_coeff": 1e-3,
            "use_kl_loss": True, "kl_loss_coef": 5e-3, "kl_loss_type": "low_var_kl",
            "fsdp_config.param_offload": args.offload == "recipe",
            "fsdp_config.optimizer_offload": args.offload != "none",
        },
        "actor_rollout_ref.ref": {
            "fsdp_config.param_offload": args.offload != "none",
            "log_prob_micro_batch_size_per_gpu": args.logprob_micro_batch,
        },
        "actor_rollout_ref.rollout": {
            "name": "vllm", "tensor_model_parallel_size": 1, "n": args.n, "enforce_eager": False,
            "gpu_memory_utilization": args.gpu_memory_utilization, "max_model_len": 8192,
            "temperature": 1.0, "top_p": 1.0, "ignore_eos": True, "+limit_images": max(args.frames, 8),
            "log_prob_micro_batch_size_per_gpu": args.logprob_micro_batch,
            # ours runs vLLM's H100 defaults for its LLM class; verl's own are 8192 and 256
            "max_num_batched_tokens": 16384, "max_num_seqs": 1024,
        },
        "reward": {  # one reward worker of verl's 8: scoring 0 takes none
            "num_workers": 1, "custom_reward_function.path": work / "reward.py",
            "custom_reward_function.name": "compute_score",
        },
        # the repair and the sampler in every verl worker (fix_folder puts them on their path)
        "ray_kwargs.ray_init.runtime_env": {"+worker_process_setup_hook": f"{PROBE.stem}.setup"},
        "trainer": {
            "n_gpus_per_node": 1, "nnodes": 1, "logger": "[console,file]", "use_v1": args.trainer == "v1",
            "project_name": "veason_peer", "experiment_name": "grpo_step", "default_local_dir": work / "ckpt",
            "total_epochs": 1, "total_training_steps": args.warmup_steps + args.steps, "resume_mode": "disable",
            "val_before_train": False, "test_freq": -1, "save_freq": -1,
        },
    }  # fmt: skip
    if args.bypass_old_logprob:
        sections["algorithm"]["rollout_correction.bypass_mode"] = True
    overrides = [
        f"+{section}.{key[1:]}={value}" if key.startswith("+") else f"{section}.{key}={value}"
        for section, values in sections.items()
        for key, value in values.items()
    ]
    return overrides + list(args.overrides)


def fix_folder(work: Path) -> Path:
    """A folder under `work` holding benchmarks/peer_verl_fixes.py and peer_verl_probe.py alone, for verl's
    processes' path (this repository is not on it)."""
    folder = work / "verl_fixes"
    folder.mkdir(parents=True, exist_ok=True)
    for module in (FIXES, PROBE):
        shutil.copy2(module, folder / module.name)
    return folder


def verl_env(args: argparse.Namespace, work: Path) -> dict[str, str]:
    """What this process and main_ppo run with: offline, verl's step records to a file, vLLM's start-up lines."""
    # not this repository: verl's own top-level `scripts` and `tests` packages would meet ours
    inherited = [
        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO
    ]
    path = [str(fix_folder(work)), *([args.verl_site] if args.verl_site else []), *inherited]
    return {
        "PYTHONPATH": os.pathsep.join(path),
        "VERL_FILE_LOGGER_PATH": str(work / "metrics.jsonl"),  # one JSON record per step
        PROBE_DIR_ENV: str(work / "probe"),  # each worker's stack sampler writes there
        "VLLM_LOGGING_LEVEL": "INFO",  # verl sets WARN; INFO keeps vLLM's start-up lines
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(work / "hf_datasets"), "WANDB_MODE": "disabled",
    }  # fmt: skip


class VerlRun:
    """main_ppo in its own process group (its Ray cluster and vLLM processes go with it at `stop`); every output
    line to `log`, the ones that say where time goes or what failed echoed; each step's metrics with the moment
    they appeared."""

    def __init__(self, command: list[str], env: dict[str, str], work: Path) -> None:
        self.metrics_path, self.log_path = work / "metrics.jsonl", work / "verl.log"
        self.tail: collections.deque[str] = collections.deque(maxlen=60)
        self.startup_lines: list[str] = []
        self.started, self.started_wall = time.perf_counter(), time.time()
        self.probe_dir = work / "probe"
        self.announced: dict[int, str] = {}  # pid -> the FSDP worker's task last said
        self.process = subprocess.Popen(
            command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            errors="replace", start_new_session=True,
        )  # fmt: skip
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        with self.log_path.open("w") as log:
            for line in self.process.stdout:
                log.write(line)
                self.tail.append(line.rstrip())
                if any(marker in line for marker in STARTUP_LOG_MARKERS):
                    self.startup_lines.append(line.strip()[-200:])
                if any(marker in line for marker in SHOWN):
                    say(f"  verl: {line.strip()[-240:]}")

    def announce_tasks(self) -> None:
        """A line for each method verl's FSDP worker (WorkerDict) starts, from its stack sampler's file: the
        stages between two step records (log-probs, update), when each began and the memory last sampled."""
        for probe in read_probes(self.probe_dir):
            if not probe["timeline"]:
                continue
            _, title, rss, gpu = probe["timeline"][-1]
            if "WorkerDict." not in title or self.announced.get(probe["pid"]) == title:
                continue
            self.announced[probe["pid"]] = title
            start = task_spans(probe)[-1]["start"]
            say(f"verl worker: {short(title)} from {start - self.started_wall:.0f} s after launch "
                f"(RSS {rss:.1f} GiB, GPU {gpu:.1f} GiB allocated)")  # fmt: skip

    def write_probe_log(self, memory: ProcessMemory) -> None:
        """<work>/probe.log: each worker's tasks and where their time went (benchmarks/peer_verl_probe.py), then
        every process's memory (USS: its own pages; the object store's part apart); the FSDP worker's tasks
        printed too."""
        lines = summary_lines(read_probes(self.probe_dir), since=self.started_wall)
        table = memory_table(memory.summaries(), per=60, unit="s")
        (self.log_path.parent / "probe.log").write_text(
            "seconds after launch; RSS and torch's GPU memory as each worker's sampler saw them\n"
            + "\n".join(lines) + "\n\nprocess memory over the run (sampled every 10 s)\n" + table + "\n"
        )  # fmt: skip
        worker = [line for line in lines if "WorkerDict." in line and " s  " in line]
        say(f"verl's FSDP worker, task by task ({self.log_path.parent / 'probe.log'} has the rest):")
        print("\n".join(worker), flush=True)

    def records(self) -> list[dict]:
        if not self.metrics_path.is_file():
            return []
        complete = self.metrics_path.read_text().split("\n")[:-1]  # a line still being written waits
        return [json.loads(line) for line in complete if line.strip()]

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL, to main_ppo's process group and every process under it (a Ray worker or vLLM
        process that left the group included: they hold the GPU)."""
        import psutil

        try:
            processes = [psutil.Process(self.process.pid)]
            processes += processes[0].children(recursive=True)
        except psutil.NoSuchProcess:
            processes = []
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, sig)
            for process in processes:
                with contextlib.suppress(psutil.Error):
                    process.send_signal(sig)
            _, alive = psutil.wait_procs(processes, timeout=grace_s)
            if not alive:
                break
        self.process.wait()
        self.reader.join(timeout=5)


def memory_peaks(monitor: MemoryMonitor) -> dict[str, str]:
    """The monitor's peaks so far, on the device and on the node, as the tables print them."""
    return {"memory": monitor.device() or "not sampled (no nvidia-smi)", "host_memory": monitor.host()}


def watch(
    run: VerlRun, total: int, args: argparse.Namespace, monitor: MemoryMonitor | None, warmup_peaks: dict
) -> list[dict]:
    """Each step's record as it appears (with `seen_s`, seconds after launch), until `total` steps, the process
    ends or `--timeout-s`; the memory peak restarts after the warm-up steps, whose peaks go to `warmup_peaks`."""
    seen: list[dict] = []
    while len(seen) < total and run.process.poll() is None and time.perf_counter() - T0 < args.timeout_s:
        time.sleep(1.0)
        run.announce_tasks()
        for record in run.records()[len(seen) :]:
            record["seen_s"] = time.perf_counter() - run.started
            seen.append(record)
            data = record["data"]
            kind = "warm-up" if len(seen) <= args.warmup_steps else "timed"
            say(f"{kind} step {record['step']}: {data['timing_s/step']:.1f} s (" + ", ".join(
                f"{key[9:]} {data[key]:.1f}" for _, key in STAGES if key in data) + ")")  # fmt: skip
            if len(seen) == args.warmup_steps and monitor is not None:
                warmup_peaks.update(memory_peaks(monitor))
                monitor.reset()
    if len(seen) < total:
        say(f"stopped after {len(seen)} of {total} steps (exit code {run.process.poll()}); last output:")
        print("\n".join(run.tail), flush=True)
    else:  # a clean exit if it comes soon; `stop` ends the rest
        with contextlib.suppress(subprocess.TimeoutExpired):
            run.process.wait(timeout=20)
    return seen


def summarise(timed: list[dict]) -> dict[str, float]:
    """Mean seconds per stage over the timed steps; tokens/s/GPU as EasyR1 (prompt + response tokens of every
    sequence / step seconds / GPUs, one GPU here) over their summed tokens and seconds."""
    keys = sorted({k for r in timed for k in r["data"] if k.startswith("timing_s/")})
    mean = {k: sum(r["data"].get(k, 0.0) for r in timed) / len(timed) for k in keys}
    tokens = sum(r["data"]["perf/total_num_tokens"] for r in timed)
    mean["tokens"] = tokens / len(timed)
    mean["tokens_per_s_per_gpu"] = tokens / sum(r["data"]["timing_s/step"] for r in timed)
    for key in ("response_length/mean", "prompt_length/mean", "response_length/clip_ratio"):
        mean[key] = sum(r["data"].get(key, 0.0) for r in timed) / len(timed)
    for kind in ("allocated", "reserved"):
        peaks = [v for r in timed for k, v in r["data"].items() if k.endswith(f"max_memory_{kind}_gb")]
        mean[f"learner_peak_{kind}_gib"] = max(peaks, default=0.0)
    return mean


def print_table(args: argparse.Namespace, timed: list[dict], mean: dict[str, float], info: dict) -> None:
    print(
        f"\nverl {info.get('verl_version', VERL_VERSION)} GRPO step ({args.trainer}) on {info['device']}: Qwen2.5-VL "
        f"3B shapes (random init), {args.prompts} prompts x {args.n}, {args.frames} frames at {args.size} px, "
        f"{args.max_new_tokens} new tokens; start-up {info['startup_s']:.0f} s (launch to step 1), warm-up "
        f"step {info['warmup_s']:.0f} s"
    )  # fmt: skip
    if warmup_only(info):
        print(
            f"{info['steps_shown']} (a first step's costs included: vLLM's Triton kernels, verl's data workers)"
        )
    width, columns = 52, [f"step {r['step']}" for r in timed] + ["mean"]
    print(f"{'seconds per step':<{width}}" + "".join(f"{c:>10}" for c in columns))
    named = [key for _, key in STAGES]
    other = [k for k in mean if k.startswith("timing_s/") and k not in named and k != "timing_s/step"]
    rows = [
        (label, [r["data"].get(key, 0.0) for r in timed], mean[key], "{:>10.2f}")
        for label, key in [*STAGES, *((k[9:], k) for k in other), ("step", "timing_s/step")]
        if key in mean
    ]
    tokens = [r["data"]["perf/total_num_tokens"] for r in timed]
    rows.append(("tokens (prompt + response, all sequences)", tokens, mean["tokens"], "{:>10,.0f}"))
    rate = [n / r["data"]["timing_s/step"] for n, r in zip(tokens, timed, strict=True)]
    rows.append(("tokens/s/GPU (EasyR1's definition)", rate, mean["tokens_per_s_per_gpu"], "{:>10,.0f}"))
    for label, values, total, fmt in rows:
        print(f"{label:<{width}}" + "".join(fmt.format(v) for v in values) + fmt.format(total))
    print(
        f"vs EasyR1's {EASYR1_TOKENS_PER_S_PER_GPU:,.0f}: {mean['tokens_per_s_per_gpu'] / EASYR1_TOKENS_PER_S_PER_GPU:.2f}x"
        f"; responses: mean {mean['response_length/mean']:.0f} tokens ({mean['response_length/clip_ratio']:.0%} at "
        f"the cap), prompts {mean['prompt_length/mean']:.0f}\npeak GPU memory "
        f"{'of the warm-up' if warmup_only(info) else 'after the warm-up'}: {info['memory']}"
        f"\npeak host memory: {info['host_memory']}"
    )
    for line in info["startup_lines"][:20]:
        print(f"  vLLM start-up: {line}")


def print_side_by_side(ours_path: Path, mean: dict[str, float], info: dict) -> None:
    """Our GRPO step (benchmarks/grpo_step.py's --out JSON) beside verl's, by the stages both have."""
    ours = json.loads(ours_path.read_text())
    o, steps = ours["mean"], ours["steps"]
    reference = sum(s.get("learner/reference_seconds", 0.0) for s in steps) / len(steps)
    g = mean.get
    rows = [
        ("generation (+ engine sleep, rewards)", o["time/generate_s"] + o["time/sleep_s"] + o["time/reward_wait_s"],
         g("timing_s/gen", 0) + g("timing_s/reward", 0)),
        ("old log-probs", 0.0, g("timing_s/old_log_prob", 0)),
        ("reference log-probs", reference, g("timing_s/ref", 0)),
        ("learner in all (log-probs, update, advantages)", o["time/update_s"] + o["time/other_s"],
         sum(g(k, 0) for k in ("timing_s/old_log_prob", "timing_s/ref", "timing_s/adv", "timing_s/update_actor"))),
        ("weight sync (+ engine wake)", o["time/sync_s"] + o["time/wake_s"], g("timing_s/update_weights", 0)),
        ("step", o["time/step_s"], g("timing_s/step", 0)),
    ]  # fmt: skip
    verl_steps = "verl: warm-up" if warmup_only(info) else "timed"
    print(f"\n{f'seconds per step (ours: timed; {verl_steps})':<48}{'ours':>10}{'verl':>10}{'verl/ours':>11}")
    for label, mine, theirs in rows:
        print(
            f"{label:<48}{mine:>10.2f}{theirs:>10.2f}" + (f"{theirs / mine:>10.2f}x" if mine else f"{'':>11}")
        )
    ratio = o["tokens_per_s_per_gpu"] / mean["tokens_per_s_per_gpu"]
    print(f"{'tokens/s/GPU':<48}{o['tokens_per_s_per_gpu']:>10,.0f}{mean['tokens_per_s_per_gpu']:>10,.0f}"
          f"   ours / verl: {ratio:.2f}x")  # fmt: skip
    print(f"start-up s: ours {ours['info']['startup_s']:.0f}, verl {info['startup_s']:.0f}\n"
          f"peak GPU memory: ours {ours['info']['memory']}; verl {info['memory']}\n"
          f"peak host memory: ours {ours['info'].get('host_memory', 'not measured')}; verl {info['host_memory']}")  # fmt: skip


def prepare(args: argparse.Namespace, work: Path) -> tuple[list[str], dict]:
    """The policy folder (written if missing, except in a dry run), the dataset and reward file, verl's check of
    both, and the command."""
    if not args.dry_run and not (Path(args.model) / "config.json").is_file():
        say(f"writing the random-init 3B policy to {args.model}")
        write_random_3b_in_child(Path(args.model))
    text, tokens, count = write_inputs(args, work)
    size = (work / "train.parquet").stat().st_size / 2**20
    say(f"dataset: {count} prompts ({size:.0f} MiB), {tokens} prompt tokens each; reward file written")
    max_prompt = round_up(tokens + 64, 64)  # headroom for verl's tokenization; training drops the padding
    overrides = verl_overrides(args, work, max_prompt)
    info = {"prompt_tokens": tokens, "max_prompt_length": max_prompt}
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        try:
            check = pool.submit(
                check_with_verl, overrides, args.model, text, work, args.verl_site, not args.dry_run
            )
            info |= check.result()
        except ModuleNotFoundError as error:
            if not args.dry_run:
                raise
            say(f"verl's config and dataset check skipped: {error} (see --verl-site)")
    if "verl_version" in info:
        say(
            f"verl {info['verl_version']}: config validated; its dataset renders our prompt ({tokens} tokens)"
        )
    return [sys.executable, "-m", "verl.trainer.main_ppo", *overrides], info


def parse_args() -> argparse.Namespace:
    doc = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=doc)
    add = parser.add_argument
    add("overrides", nargs="*", help="verl Hydra overrides key=value, applied last")
    add("--model", default="", help=f"the policy folder, written if missing (default: {POLICY_DIRNAME})")
    add("--steps", type=int, default=1, help="timed steps after the warm-up")
    add("--warmup-steps", type=int, default=1)
    for name, default in (("prompts", 16), ("n", 8), ("frames", 6), ("size", 560), ("max-new-tokens", 1024)):
        add(f"--{name}", type=int, default=default, help="the work, as benchmarks/grpo_step.py's")
    add("--micro-batch", type=int, default=2, help="sequences per update micro-batch")
    add(
        "--logprob-micro-batch",
        type=int,
        default=2,
        help="sequences per log-prob micro-batch (8: out of memory)",
    )
    add("--gpu-memory-utilization", type=float, default=0.25, help="vLLM's share (ours: 0.25)")
    add("--trainer", choices=("v0", "v1"), default="v0", help="v0: RayPPOTrainer; v1: TransferQueue's")
    add(
        "--offload",
        choices=("optimizer", "recipe", "none"),
        default="none",
        help="what verl keeps in CPU memory between uses (see Memory above)",
    )
    add(
        "--bypass-old-logprob",
        action="store_true",
        help="old log-probs from the rollout: no pass of their own, as ours",
    )
    add("--timeout-s", type=float, default=540, help="stop verl this many s after start (a call: 600)")
    add("--ours", default="", help="benchmarks/grpo_step.py's --out JSON: print the two side by side")
    add("--compare", default="", help="an earlier --out JSON: print its tables (--ours beside)")
    add("--out", default="", help="write the steps and the summary as JSON here (verl's log beside it)")
    add("--work-dir", default="", help="keep dataset, logs and metrics here (default: a temporary folder)")
    add("--verl-site", default="", help="a folder holding verl and its packages, put first on the path")
    add("--dry-run", action="store_true", help="prepare and print the command, launch nothing")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup_steps < 0:
        parser.error("--steps must be at least 1, --warmup-steps at least 0")
    return args


def print_tables(
    args: argparse.Namespace, timed: list[dict], mean: dict[str, float], info: dict, ours: str
) -> None:
    """verl's table, and ours beside it where `ours` (benchmarks/grpo_step.py's --out JSON) names a file."""
    print_table(args, timed, mean, info)
    if ours and Path(ours).is_file():
        print_side_by_side(Path(ours), mean, info)
    elif ours:
        say(f"{ours} not found (run ours after?): verl's table only")


def shown_steps(steps: list[dict], warmup_steps: int) -> tuple[list[dict], str]:
    """The timed steps, or where none finished the warm-up steps (a first step's costs included: vLLM's Triton
    kernels compiled on first use, verl's agent-loop workers reading the dataset), and which they are."""
    timed = steps[warmup_steps:]
    return (timed, "timed steps") if timed else (steps, "warm-up step only: no timed step finished")


def warmup_only(info: dict) -> bool:
    """Whether the steps shown are the warm-up's, no timed step having finished (`shown_steps`)."""
    return info.get("steps_shown", "timed steps") != "timed steps"


def finish(args: argparse.Namespace, run: VerlRun, seen: list[dict], info: dict) -> int:
    """The table (and ours beside it), the JSON and the end of verl's log under --out."""
    shown, info["steps_shown"] = shown_steps(seen, args.warmup_steps)
    mean = summarise(shown) if shown else {}
    if mean:
        info["memory"] += (
            f" (learner rank: {mean['learner_peak_allocated_gib']:.1f} GiB allocated by torch, "
            f"{mean['learner_peak_reserved_gib']:.1f} reserved)"
        )
        print_tables(args, shown, mean, info, args.ours)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"args": vars(args), "info": info, "steps": seen, "mean": mean}))
        with run.log_path.open("rb") as log:  # its end, within what the device tool brings back
            log.seek(max(0, run.log_path.stat().st_size - 8 * 2**20))
            out.with_suffix(".log").write_bytes(log.read())
    timed = len(seen) > args.warmup_steps
    if not timed:
        say(f"no timed step finished; peak GPU memory {info['memory']}, host {info['host_memory']}")
    return 0 if timed else 1


def compare(args: argparse.Namespace) -> int:
    """The tables of an earlier run from its JSON, ours beside it: for a chain that ran verl before ours."""
    run = json.loads(Path(args.compare).read_text())
    earlier = argparse.Namespace(**run["args"])
    shown, run["info"]["steps_shown"] = shown_steps(run["steps"], earlier.warmup_steps)
    if not shown:
        say(f"{args.compare}: no step finished; peak GPU memory {run['info']['memory']}")
        return 1
    print_tables(earlier, shown, summarise(shown), run["info"], args.ours)
    return 0


def main() -> int:
    args = parse_args()
    if args.compare:
        return compare(args)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="peer_grpo_step_"))
    work.mkdir(parents=True, exist_ok=True)
    args.model = args.model or str(work / POLICY_DIRNAME)
    os.environ.update(verl_env(args, work))
    try:
        command, info = prepare(args, work)
        say(f"verl command (in {work}):\n  " + " \\\n    ".join(shlex.quote(c) for c in command))
        if args.dry_run:
            return 0
        monitor, warmup_peaks = MemoryMonitor(), {}
        run = VerlRun(command, dict(os.environ), work)
        memory = ProcessMemory(run.process.pid, root_label="main_ppo")
        try:
            with memory.sampling(every_s=10.0, progress=lambda: time.perf_counter() - run.started):
                seen = watch(run, args.warmup_steps + args.steps, args, monitor, warmup_peaks)
        finally:
            run.stop()
            monitor.stop()
        try:  # what the samplers wrote stays; a failure to summarise it loses no step
            run.write_probe_log(memory)
        except (OSError, ValueError, KeyError, TypeError) as error:
            say(f"probe.log not written: {error!r} (the raw files are in {run.probe_dir})")
        first = seen[0] if seen else {"seen_s": 0.0, "data": {"timing_s/step": 0.0}}
        only_warmup = len(seen) == args.warmup_steps and warmup_peaks  # then the warm-up's own peaks
        info |= warmup_peaks if only_warmup else memory_peaks(monitor)
        info |= {
            "device": monitor.name or "no GPU seen",
            "command": command,
            "startup_s": first["seen_s"] - first["data"]["timing_s/step"],  # launch to the start of step 1
            "warmup_s": sum(r["data"]["timing_s/step"] for r in seen[: args.warmup_steps]),
            "startup_lines": run.startup_lines,
        }
        return finish(args, run, seen, info)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)  # the dataset, datasets' cache of it, a written policy


if __name__ == "__main__":
    sys.exit(main())
