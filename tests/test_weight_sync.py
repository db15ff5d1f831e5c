"""Weight buckets and checksums (pure), and the GPU transports (CUDA only: they are skipped on CPU machines)."""

from __future__ import annotations

import pytest
import torch

from veason_ray.weight_transport import checksum_weights, pack_buckets, unpack_bucket


def _weights() -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        ("a", torch.randn(64, 32, generator=gen).to(torch.bfloat16)),
        ("b", torch.randn(10, generator=gen)),
        ("c", torch.randint(0, 100, (7, 3), generator=gen)),
        ("big", torch.randn(300, 100, generator=gen).to(torch.float16)),
        ("d", torch.randn(5, 5, generator=gen).t()),  # not contiguous
    ]


def test_buckets_round_trip_every_tensor_bit_for_bit():
    weights = _weights()
    buckets = list(pack_buckets(weights, bucket_bytes=8 * 1024, version=3))
    assert len(buckets) == 3 and all(b.version == 3 and b.buffer.dtype == torch.uint8 for b in buckets)
    unpacked = [item for b in buckets for item in unpack_bucket(b)]
    assert [n for n, _ in unpacked] == [n for n, _ in weights]
    for (_, got), (_, want) in zip(unpacked, weights, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)


def test_buckets_respect_the_size_and_a_large_tensor_travels_alone():
    weights = _weights()
    buckets = list(pack_buckets(weights, bucket_bytes=5000))
    sizes = {n: t.numel() * t.element_size() for n, t in weights}
    for bucket in buckets:
        assert bucket.nbytes <= 5000 or len(bucket.names) == 1
    assert ["big"] in [b.names for b in buckets] and sizes["big"] > 5000
    with pytest.raises(ValueError):
        list(pack_buckets(weights, bucket_bytes=0))


def test_ring_buckets_alternate_between_the_ring_buffers_and_a_large_tensor_gets_its_own():
    """The pipelined IPC sender's layout: bucket k lives in ring[k % 2] (one IPC handle per buffer), so only
    two buffers exist however many buckets; a tensor larger than a ring slot is packed apart."""
    weights = _weights()
    ring = [torch.empty(5000, dtype=torch.uint8) for _ in range(2)]
    buckets = []
    for bucket in pack_buckets(weights, bucket_bytes=5000, ring=ring):
        # unpack now: the buffer of bucket k is rewritten by bucket k + 2
        buckets.append((bucket.names, bucket.buffer, [t.clone() for _, t in unpack_bucket(bucket)]))
    assert len(buckets) == 3
    owners = [
        next((i for i, r in enumerate(ring) if b.data_ptr() == r.data_ptr()), None) for _, b, _ in buckets
    ]
    assert owners == [0, None, 0]  # bucket 1 is "big" (60,000 bytes): a buffer of its own
    assert buckets[1][0] == ["big"]
    unpacked = [t for _, _, tensors in buckets for t in tensors]
    for got, (_, want) in zip(unpacked, weights, strict=True):
        assert torch.equal(got, want)


def test_checksum_ignores_layout_and_counts_tied_tensors_once():
    weights = _weights()
    a = checksum_weights(weights)
    fused = torch.cat([weights[0][1].float().view(-1), weights[1][1]])  # as if two tensors were fused
    b = checksum_weights([("fused", fused), *weights[2:]])
    assert a.matches(b)
    tied = weights[0][1]
    assert checksum_weights([*weights, ("tied", tied)]).matches(a)
    changed = [(n, t.clone()) for n, t in weights]
    changed[0][1][0, 0] += 1
    assert not checksum_weights(changed).matches(a)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC and NCCL need GPUs")


@needs_cuda
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ipc", "nccl"])
def test_gpu_transport_syncs_engine_to_learner_checksum(kind, tmp_path):
    """On a GPU machine: a pool of one engine, a learner copy on the same GPU, a zeroed head pushed through
    the native weight-transfer API; the engine's checksum equals the learner's."""
    import ray
    from transformers import Qwen2_5_VLForConditionalGeneration

    from actors.rollout_pool import RolloutPool
    from actors.weight_sync import make_transport
    from veason_ray.config import RolloutConfig
    from veason_ray.models.tiny_qwen import write_tiny_qwen

    model_dir = write_tiny_qwen(tmp_path / "tiny", seed=0)
    # NCCL: the learner must sit on another GPU than the engine (Ray gives the engine GPU 0).
    device = "cuda:0" if kind == "ipc" else f"cuda:{torch.cuda.device_count() - 1}"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16).to(device)
    ray.init(num_gpus=1 if kind == "ipc" else 2, include_dashboard=False)
    try:
        cfg = RolloutConfig(
            engines=1,
            gpus_per_engine=0.5 if kind == "ipc" else 1.0,
            weight_transport=kind,
            enforce_eager=True,
            max_model_len=2048,
            gpu_memory_utilization=0.2,
        )
        pool = RolloutPool(str(model_dir), cfg)
        embed = "model.language_model.embed_tokens.weight"
        state = dict(model.state_dict())
        state[embed] = state["lm_head.weight"] = torch.zeros_like(state[embed])
        report = pool.update_weights(make_transport(kind, 1 << 20), lambda: state.items())
        assert report.version == 1
        assert pool.weight_checksums()[0].matches(checksum_weights(state.items()))
        if kind == "ipc":  # where the push's seconds went (benchmarks/rollout.py prints them)
            assert {"init", "start", "pack", "wait", "buckets", "finish", "free"} <= set(report.phases)
            assert sum(v for k, v in report.phases.items() if k not in ("pack", "wait")) <= report.seconds
    finally:
        ray.shutdown()
