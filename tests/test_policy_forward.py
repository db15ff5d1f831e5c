"""Sequences, padding and response log-probs of the learner (pure torch, tiny Qwen2.5-VL, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from veason_ray.prompts import build_messages
from veason_ray.training.policy_forward import response_logprobs
from veason_ray.training.policy_weights import named_weights
from veason_ray.training.sequences import (
    PolicySequence,
    collate,
    encode_prompt,
    loss_mask,
    pack_by_tokens,
    split_micro_batches,
)
from veason_ray.weight_transport import checksum_weights


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from veason_ray.models.tiny_qwen import write_tiny_qwen

    model_dir = write_tiny_qwen(tmp_path_factory.mktemp("tiny") / "qwen2_5_vl_tiny", seed=0)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(model_dir)


def _prompt(processor, frames: int, seed: int):
    rng = np.random.default_rng(seed)
    images = list(rng.integers(0, 256, (frames, 112, 112, 3), dtype=np.uint8))
    return encode_prompt(processor, build_messages(list(range(0, 2 * frames, 2)), "the red square", images))


def _two_sharing_a_prompt(processor, seed: int, lengths: tuple[int, int, int]) -> list[PolicySequence]:
    """Three responses of random tokens: the first and third to one 2-frame prompt, the second to a 3-frame one."""
    gen = torch.Generator().manual_seed(seed)
    shared, other = _prompt(processor, 2, seed + 2), _prompt(processor, 3, seed + 3)
    return [
        PolicySequence(prompt, torch.randint(100, 300, (n,), generator=gen))
        for prompt, n in zip((shared, other, shared), lengths, strict=True)
    ]


def _full_forward_logprobs(model, seq: PolicySequence) -> torch.Tensor:
    """The reference: the whole model on one unpadded sequence, log-softmax of every position."""
    ids = torch.cat([seq.prompt.input_ids, seq.response_ids])[None]
    extra = {
        k: torch.cat([v, torch.zeros_like(seq.response_ids)])[None]
        for k, v in seq.prompt.token_inputs.items()
    }
    with torch.no_grad():
        logits = model(
            input_ids=ids, attention_mask=torch.ones_like(ids), **extra, **seq.prompt.vision_inputs
        ).logits
    p = len(seq.prompt)
    logp = torch.log_softmax(logits[0, p - 1 : -1].float(), -1)
    return logp.gather(-1, seq.response_ids[:, None]).squeeze(-1)


def _step(model, batch, chunk_tokens: int = 4):
    """Log-probs, entropies and the gradients of a loss on both (the head chunked as the learner's, or plain)."""
    model.zero_grad()
    logprobs, entropy = response_logprobs(model, batch, with_entropy=True, chunk_tokens=chunk_tokens)
    ((logprobs + 0.1 * entropy) * batch.response_mask).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logprobs.detach(), entropy.detach(), grads


def test_padded_batch_logprobs_equal_each_sequence_alone(tiny):
    model, processor = tiny
    gen = torch.Generator().manual_seed(0)
    sequences = [
        PolicySequence(_prompt(processor, 2, 0), torch.randint(100, 300, (7,), generator=gen)),
        PolicySequence(_prompt(processor, 3, 1), torch.randint(100, 300, (12,), generator=gen)),
        PolicySequence(_prompt(processor, 2, 2), torch.randint(100, 300, (3,), generator=gen)),
    ]
    assert len({len(s.prompt) for s in sequences}) == 2  # different prompt lengths: real padding
    batch = collate(sequences, pad_id=0)
    with torch.no_grad():
        logprobs, entropy = response_logprobs(model, batch, with_entropy=True)
    for row, seq in enumerate(sequences):
        n = int(seq.response_ids.numel())
        want = _full_forward_logprobs(model, seq)
        assert torch.allclose(logprobs[row, :n], want, atol=1e-5), (
            row,
            (logprobs[row, :n] - want).abs().max(),
        )
        assert batch.response_mask[row, :n].all() and not batch.response_mask[row, n:].any()
    assert (entropy[batch.response_mask.bool()] > 0).all()
    vocab = model.config.text_config.vocab_size
    assert (entropy <= np.log(vocab) + 1e-4).all()


def test_packed_batch_equals_the_padded_batch_in_logprobs_and_gradients(tiny):
    """Packed (one row, no padding, attention within each sequence) gives the padded batch's log-probs,
    entropies and gradients: three sequences of uneven lengths, two sharing a prompt, one with 2 and one with 3
    frames, through the model with gradient checkpointing as the learner runs it."""
    import copy

    from veason_ray.training.packed_attention import enable_packed_attention

    base, processor = tiny
    model = copy.deepcopy(base)
    enable_packed_attention(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    sequences = _two_sharing_a_prompt(processor, seed=11, lengths=(13, 2, 5))
    padded, packed = collate(sequences, pad_id=0), collate(sequences, pad_id=0, packed=True)
    assert packed.input_ids.shape == (1, sum(s.num_tokens for s in sequences))
    assert packed.tokens == padded.tokens and packed.row_bounds[-1] == packed.input_ids.shape[1]
    assert padded.input_ids.numel() > packed.input_ids.numel()  # the padding that packing saves

    lp_pad, ent_pad, grad_pad = _step(model, padded)
    lp_pack, ent_pack, grad_pack = _step(model, packed)
    mask = padded.response_mask.bool()
    assert torch.allclose(lp_pack[mask], lp_pad[mask], atol=1e-5)
    assert torch.allclose(ent_pack[mask], ent_pad[mask], atol=1e-5)
    for row, seq in enumerate(sequences):  # and each sequence alone
        n = int(seq.response_ids.numel())
        assert torch.allclose(lp_pack[row, :n], _full_forward_logprobs(base, seq), atol=1e-5)
    assert grad_pad.keys() == grad_pack.keys() and len(grad_pad) > 10
    for name, want in grad_pad.items():
        assert torch.allclose(grad_pack[name], want, atol=1e-5, rtol=1e-4), name


def test_attention_buckets_give_the_exact_padded_batch(tiny):
    """learner.attention_bucket_tokens: padded rows rounded up to the multiple with causal attention and no
    padding mask, and packed rows whose sequences are padded to it inside attention, give the exact padded
    batch's log-probs, entropies and gradients (float32, gradient checkpointing, uneven lengths, two prompts)."""
    import copy

    from veason_ray.training.packed_attention import enable_packed_attention

    base, processor = tiny
    model = copy.deepcopy(base)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    sequences = _two_sharing_a_prompt(processor, seed=5, lengths=(9, 3, 6))
    exact = collate(sequences, pad_id=0)
    bucket = 16
    padded = collate(sequences, pad_id=0, attention_bucket=bucket)
    packed = collate(sequences, pad_id=0, packed=True, attention_bucket=bucket)
    assert padded.input_ids.shape[1] % bucket == 0 and padded.input_ids.shape[1] > exact.input_ids.shape[1]
    assert padded.tokens == exact.tokens  # the extra columns are padding
    assert packed.input_ids.shape == (1, exact.tokens) and packed.attention_bucket == bucket
    assert any((b - a) % bucket for a, b in zip(packed.row_bounds[:-1], packed.row_bounds[1:], strict=True))

    lp_exact, ent_exact, grad_exact = _step(model, exact)  # plain SDPA with the padding mask
    mask = exact.response_mask.bool()
    lp, ent, grads = _step(model, padded)  # plain SDPA, causal, no mask
    assert torch.allclose(lp[mask], lp_exact[mask], atol=1e-5)
    assert torch.allclose(ent[mask], ent_exact[mask], atol=1e-5)
    for name, want in grad_exact.items():
        assert torch.allclose(grads[name], want, atol=1e-5, rtol=1e-4), name
    enable_packed_attention(model)
    for batch in (packed, padded):  # the packed implementation; without bounds it is plain SDPA
        lp, ent, grads = _step(model, batch)
        assert torch.allclose(lp[mask], lp_exact[mask], atol=1e-5)
        assert torch.allclose(ent[mask], ent_exact[mask], atol=1e-5)
        assert grads.keys() == grad_exact.keys()
        for name, want in grad_exact.items():
            assert torch.allclose(grads[name], want, atol=1e-5, rtol=1e-4), name


def test_attention_buckets_refuse_eager_attention(tiny):
    """Without its padding mask, eager attention would attend everywhere: the bucketed padded path refuses it,
    naming the keys."""
    import copy

    base, processor = tiny
    model = copy.deepcopy(base)
    model.model.language_model.config._attn_implementation = "eager"
    batch = collate(_two_sharing_a_prompt(processor, seed=6, lengths=(4, 2, 3)), pad_id=0, attention_bucket=8)
    with pytest.raises(ValueError, match="attention_bucket_tokens.*attn_implementation=sdpa"):
        response_logprobs(model, batch)
    with pytest.raises(ValueError, match="attention_bucket_tokens must be >= 0"):
        collate(_two_sharing_a_prompt(processor, seed=6, lengths=(4, 2, 3)), pad_id=0, attention_bucket=-1)


def test_pack_by_tokens_fills_each_micro_batch_in_order_up_to_the_budget():
    a, b, c = _FakePrompt(10), _FakePrompt(10), _FakePrompt(10)
    lengths = (5, 20, 1, 3, 40, 2)
    lone = [
        PolicySequence(p, torch.zeros(r, dtype=torch.long))
        for p, r in zip([a, b, c] * 2, lengths, strict=True)
    ]
    chunks = pack_by_tokens(lone, 40)  # tokens 15, 30, 11, 13, 50, 12: no two neighbours share a prompt
    assert [[s.num_tokens for s in c] for c in chunks] == [[15], [30], [11, 13], [50], [12]]
    assert [s for c in chunks for s in c] == lone  # order kept
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        pack_by_tokens(lone, 0)


def test_pack_by_tokens_keeps_a_group_in_one_micro_batch_when_it_fits_one():
    """Groups of 3 x 12 tokens under a budget of 50: a group never straddles two micro-batches (its images would
    be encoded twice); a group larger than the budget (4 x 20 tokens) is split by sequences."""
    a, b, c, big = (_FakePrompt(10) for _ in range(4))
    group = [PolicySequence(p, torch.zeros(2, dtype=torch.long)) for p in (a, a, a, b, b, b, c, c, c)]
    chunks = pack_by_tokens(group, 50)
    assert [[id(s.prompt) for s in ch] for ch in chunks] == [[id(a)] * 3, [id(b)] * 3, [id(c)] * 3]
    large = [PolicySequence(big, torch.zeros(10, dtype=torch.long)) for _ in range(4)]
    chunks = pack_by_tokens(group[:3] + large, 50)
    assert [[s.num_tokens for s in ch] for ch in chunks] == [[12, 12, 12], [20, 20], [20, 20]]


class _FakePrompt:
    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length


def test_vision_tokens_in_a_response_are_fed_as_pad_and_mask_what_follows(tiny):
    model, processor = tiny
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    response = torch.tensor([101, 102, image_pad, 103, 104])
    assert loss_mask(response, [image_pad]).tolist() == [True, True, True, False, False]
    seq = PolicySequence(_prompt(processor, 2, 0), response)
    batch = collate([seq], pad_id=0, forbidden_ids=[image_pad])
    p = len(seq.prompt)
    assert batch.input_ids[0, p + 2] == 0 and batch.response_ids[0, 2] == image_pad
    with torch.no_grad():  # the model accepts it (its image-token count still matches the images)
        logprobs, _ = response_logprobs(model, batch)
    assert torch.isfinite(logprobs).all()


def test_micro_batches_split_in_order():
    assert split_micro_batches(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    with pytest.raises(ValueError, match="micro_batch_size"):
        split_micro_batches([1], 0)


def test_named_weights_are_the_checkpoint_names_and_merge_lora(tiny):
    from peft import LoraConfig, get_peft_model

    model, _ = tiny
    state = model.state_dict()
    out = dict(named_weights(model))
    assert set(out) == set(state) - {"lm_head.weight"}  # tied to embed_tokens: sent once
    assert checksum_weights(out.items()).matches(checksum_weights(state.items()))

    import copy

    lora = get_peft_model(
        copy.deepcopy(model),
        LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)"),
    )
    for name, param in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    merged = dict(named_weights(lora))
    assert set(merged) == set(out)
    changed = {n for n in out if not torch.equal(out[n], merged[n])}
    assert changed and all(("q_proj" in n or "v_proj" in n) and "language_model" in n for n in changed)
    name = sorted(changed)[0]
    layer = lora.get_base_model().get_submodule(name.removesuffix(".weight"))
    want = layer.base_layer.weight + layer.get_delta_weight("default")
    assert torch.allclose(merged[name], want)


def test_rows_sharing_a_prompt_encode_its_images_once(tiny):
    """A GRPO group's responses share one prompt: the vision tower runs once per distinct prompt in a
    micro-batch, and log-probs and gradients equal those of each sequence alone."""
    model, processor = tiny
    sequences = _two_sharing_a_prompt(processor, seed=3, lengths=(6, 4, 9))
    shared, other = sequences[0].prompt, sequences[1].prompt
    batch = collate(sequences, pad_id=0)
    assert batch.prompt_of_row == [0, 1, 0] and batch.images_per_prompt == [2, 3]
    calls = []
    handle = model.model.visual.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        logprobs, _ = response_logprobs(model, batch)
    finally:
        handle.remove()
    patches = [int(p.vision_inputs["pixel_values"].shape[0]) for p in (shared, other)]
    assert calls == [sum(patches)]  # one vision pass over the two distinct prompts' images
    for row, seq in enumerate(sequences):
        n = int(seq.response_ids.numel())
        assert torch.allclose(logprobs[row, :n], _full_forward_logprobs(model, seq), atol=1e-5)

    def vision_grad(chunks):
        model.zero_grad()
        for chunk in chunks:
            lp, _ = response_logprobs(model, collate(chunk, pad_id=0))
            lp.sum().backward()
        grad = model.model.visual.blocks[0].attn.qkv.weight.grad.clone()
        model.zero_grad()
        return grad

    together = vision_grad([sequences])
    alone = vision_grad([[s] for s in sequences])
    assert torch.allclose(together, alone, atol=1e-5, rtol=1e-4)


def test_batched_vision_windows_equal_the_per_window_loop(tiny):
    """Frames whose windows differ in size (168x112: windows of 64 and 32 patches) and a full-attention layer:
    the batched attention gives the loop's outputs and gradients."""
    import copy

    from veason_ray.models.vision_window_attention import batch_vision_windows, segment_attention

    model, processor = tiny
    batched = copy.deepcopy(model)
    assert batch_vision_windows(batched) == len(batched.model.visual.blocks)
    rng = np.random.default_rng(0)
    images = list(rng.integers(0, 256, (2, 112, 168, 3), dtype=np.uint8))
    prompt = encode_prompt(processor, build_messages([0, 2], "the red square", images))
    pixels, grid = prompt.vision_inputs["pixel_values"], prompt.vision_inputs["image_grid_thw"]
    outputs = []
    for m in (model, batched):
        m.zero_grad()
        features = torch.cat(m.model.get_image_features(pixels, grid).pooler_output)
        (features * torch.linspace(-1, 1, features.numel()).view_as(features)).sum().backward()
        outputs.append((features.detach(), m.model.visual.blocks[0].attn.qkv.weight.grad.clone()))
        m.zero_grad()
    (want, want_grad), (got, got_grad) = outputs
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert torch.allclose(got_grad, want_grad, atol=1e-5, rtol=1e-4)

    q, k, v = torch.randn(3, 10, 2, 4).unbind(0)
    cu = torch.tensor([0, 3, 5, 8, 10])  # uneven segments in a packed sequence
    out = segment_attention(q, k, v, cu, 0.5)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        ref = torch.softmax((q[a:b].transpose(0, 1) @ k[a:b].permute(1, 2, 0)) * 0.5, -1) @ v[a:b].transpose(
            0, 1
        )
        assert torch.allclose(out[a:b], ref.transpose(0, 1), atol=1e-6)


@pytest.mark.parametrize("with_entropy", [True, False])
def test_chunked_token_logprobs_pass_gradcheck(with_entropy):
    from veason_ray.training.policy_forward import ChunkedTokenLogprobs

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(11, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = torch.randint(0, 11, (7,), generator=gen)
    logprobs, entropy = ChunkedTokenLogprobs.apply(hidden, weight, targets, 3, with_entropy)
    log_p = torch.log_softmax(hidden @ weight.T, -1)
    assert torch.allclose(logprobs, log_p.gather(-1, targets[:, None]).squeeze(-1))
    want_entropy = -(log_p.exp() * log_p).sum(-1) if with_entropy else torch.zeros(7, dtype=torch.float64)
    assert torch.allclose(entropy, want_entropy)

    def outputs(h, w):
        lp, ent = ChunkedTokenLogprobs.apply(h, w, targets, 3, with_entropy)
        return (lp, ent) if with_entropy else lp

    assert torch.autograd.gradcheck(outputs, (hidden, weight))


def test_chunked_logprobs_and_gradients_equal_the_plain_path(tiny):
    """`learner.logprob_chunk_tokens`: chunks that split rows and padding (5 tokens) give the plain path's
    log-probs, entropies and parameter gradients (float32)."""
    model, processor = tiny
    gen = torch.Generator().manual_seed(1)
    shared = _prompt(processor, 2, 7)
    sequences = [
        PolicySequence(shared, torch.randint(100, 300, (6,), generator=gen)),
        PolicySequence(_prompt(processor, 3, 8), torch.randint(100, 300, (11,), generator=gen)),
        PolicySequence(shared, torch.randint(100, 300, (3,), generator=gen)),
    ]
    batch = collate(sequences, pad_id=0)
    weights = torch.linspace(-1, 1, batch.response_mask.numel()).view_as(batch.response_mask)
    names = (  # the head (tied to the embeddings), a layer below it
        "model.language_model.embed_tokens.weight",
        "model.language_model.layers.0.mlp.up_proj.weight",
    )
    results = []
    for chunk in (0, 5):
        model.zero_grad()
        logprobs, entropy = response_logprobs(model, batch, with_entropy=True, chunk_tokens=chunk)
        ((logprobs + 0.3 * entropy) * weights * batch.response_mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if n in names}
        results.append((logprobs.detach(), entropy.detach(), grads))
    model.zero_grad()
    (plain_lp, plain_ent, plain_grads), (lp, ent, grads) = results
    valid = batch.response_mask.bool()
    assert torch.allclose(lp[valid], plain_lp[valid], atol=1e-5)
    assert torch.allclose(ent[valid], plain_ent[valid], atol=1e-5)
    assert set(grads) == set(names)
    for name in names:
        assert torch.allclose(grads[name], plain_grads[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.slow  # ~30 s on 2 cores with a cold Inductor cache: its compiles (C++ on the CPU)
def test_fused_elementwise_equals_transformers_norms_and_mlps_and_comes_off_again(tiny):
    """`learner.fused_elementwise`: the compiled RMSNorm and SwiGLU give transformers' log-probs, entropies and
    every gradient (float32, gradient checkpointing, both towers), for a second batch of other lengths without
    a new compile per length, and `enabled=False` restores transformers' own forwards."""
    import copy

    from veason_ray.models.fused_elementwise import fuse_elementwise

    base, processor = tiny
    model = copy.deepcopy(base)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    norms = sum(type(m).__name__.endswith("RMSNorm") for m in model.modules())
    mlps = sum(hasattr(m, "gate_proj") for m in model.modules())
    batches = [collate(_two_sharing_a_prompt(processor, seed, lengths), pad_id=0) for seed, lengths in
               ((21, (9, 4, 6)), (22, (3, 12, 5)))]  # fmt: skip

    plain = [_step(model, batch, chunk_tokens=0) for batch in batches]
    assert fuse_elementwise(model) == norms + mlps and norms >= 4 and mlps >= 4
    assert fuse_elementwise(model) == 0  # already fused
    from torch._dynamo.utils import counters

    fused = [_step(model, batches[0], chunk_tokens=0)]
    compiled = counters["stats"]["unique_graphs"]
    fused.append(_step(model, batches[1], chunk_tokens=0))
    assert counters["stats"]["unique_graphs"] == compiled  # other lengths, the same kernels
    for batch, (lp, ent, grads), (lp_f, ent_f, grads_f) in zip(batches, plain, fused, strict=True):
        mask = batch.response_mask.bool()
        assert torch.allclose(lp_f[mask], lp[mask], atol=1e-5)
        assert torch.allclose(ent_f[mask], ent[mask], atol=1e-5)
        assert grads.keys() == grads_f.keys() and len(grads) > 10
        for name, want in grads.items():
            assert torch.allclose(grads_f[name], want, atol=1e-5, rtol=1e-4), name
    assert fuse_elementwise(model, enabled=False) == norms + mlps
    restored = [m for m in model.modules() if hasattr(m, "gate_proj") or type(m).__name__.endswith("RMSNorm")]
    assert len(restored) == norms + mlps and all("forward" not in m.__dict__ for m in restored)
    assert torch.allclose(_step(model, batches[0], chunk_tokens=0)[0], plain[0][0], atol=1e-6)
