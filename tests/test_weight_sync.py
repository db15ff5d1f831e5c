"""Weight buckets and checksums (pure); the choice of transport; every push's deadline, on CPU with stand-in engine
actors that answer, fail or never answer; the NCCL sender's engine calls with vLLM's NCCL side stood in for; the
receivers' vLLM calls against a recording stand-in; and the GPU transports end to end (CUDA only: skipped on CPU
machines)."""

from __future__ import annotations

import contextlib
import pickle
import threading
import time
from typing import Any

import pytest
import ray
import torch

from actors.weight_sync import ReloadTransport, WeightSyncTimeout, receiver_class, resolve_kind
from actors.weight_sync.interface import Deadline
from actors.weight_sync.ipc import IPCReceiver
from actors.weight_sync.nccl import NCCLReceiver
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


def test_auto_is_resolved_alike_for_the_learner_and_the_engines():
    """Both sides of a pair come from one resolution: a disaggregated GPU engine is built for NCCL, as the
    learner sends over NCCL."""
    assert resolve_kind("auto", on_gpu=False, colocated=True) == "reload"
    assert resolve_kind("auto", on_gpu=True, colocated=True) == "ipc"
    assert resolve_kind("auto", on_gpu=True, colocated=False) == "nccl"
    assert resolve_kind("reload", on_gpu=True, colocated=False) == "reload"
    assert receiver_class("auto", on_gpu=True, colocated=False).vllm_backend == "nccl"
    assert receiver_class("auto", on_gpu=True, colocated=True).vllm_backend == "ipc"
    with pytest.raises(ValueError, match="rollout.weight_transport"):
        resolve_kind("tcp", on_gpu=True, colocated=True)


@ray.remote(num_cpus=0)
class StandInEngine:
    """The weight methods of a rollout engine, each call logged: it answers, fails on a bucket, or takes a bucket
    and never answers (a hung engine)."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.scratch = torch.zeros(1)  # torch imported now, not while the first bucket (tensors) arrives
        self.log: list[str] = []

    def connect_weights(self, info: dict[str, Any]) -> None:
        self.log.append(f"connect rank_offset={info['rank_offset']}")

    def prepare_weights(self) -> None:
        self.log.append("prepare")

    def receive_weights(self, payload: Any) -> None:
        self.log.append("receive")
        if self.behaviour == "silent":
            threading.Event().wait()
        if self.behaviour == "fails":
            raise ValueError("a bucket this engine cannot load")

    def finish_weights(self, version: int | None) -> float:
        self.log.append(f"finish {version}")
        return 0.0

    def disconnect_weights(self) -> None:
        self.log.append("disconnect")

    def set_weight_version(self, version: int) -> None:
        self.log.append(f"version {version}")

    def calls(self) -> list[str]:
        return self.log


def _stand_ins(*behaviours: str) -> list[Any]:
    engines = [StandInEngine.remote(b) for b in behaviours]
    ray.get([e.calls.remote() for e in engines])  # up before any deadline starts
    return engines


def _actor(engine: Any) -> str:
    return engine._actor_id.hex()[:8]


def test_a_push_an_engine_never_answers_fails_at_its_deadline_naming_it(local_ray):
    engines = _stand_ins("answers", "silent")
    try:
        transport = ReloadTransport(bucket_bytes=8 * 1024, timeout_s=2.0)
        start = time.monotonic()
        with pytest.raises(WeightSyncTimeout) as caught:
            transport.push(engines, _weights, version=7)
        waited = time.monotonic() - start
        print(f"WeightSyncTimeout after {waited:.2f} s: {caught.value}")
        assert 1.9 < waited < 2.0 + 3.0  # the deadline, plus Ray's round trips on a busy 2-core machine
        error = caught.value
        assert (error.transport, error.version, error.seconds) == ("reload", 7, 2.0)
        assert error.unanswered == [f"engine 1 (actor {_actor(engines[1])})"]  # not the engine that answered
        assert all(part in str(error) for part in ("reload", "weight version 7", "engine 1", "2 s"))
        assert str(pickle.loads(pickle.dumps(error))) == str(error)  # it crosses Ray from the learner's actor
    finally:
        for engine in engines:
            ray.kill(engine)


def test_an_engine_error_ends_the_push_at_once(local_ray):
    engines = _stand_ins("answers", "fails")
    try:
        start = time.monotonic()
        with pytest.raises(ValueError, match="cannot load"):
            ReloadTransport(bucket_bytes=8 * 1024, timeout_s=60.0).push(engines, _weights, version=1)
        assert time.monotonic() - start < 30.0
    finally:
        for engine in engines:
            ray.kill(engine)


def test_a_hung_learner_side_call_fails_at_the_deadline_naming_the_engines_still_out(local_ray):
    """The NCCL transport's rendezvous and broadcast block the learner (`Deadline.run`): a peer that never joins
    fails the push in time, naming the engines whose calls are out, or the learner's side when none is."""
    (silent,) = _stand_ins("silent")
    try:
        deadline = Deadline("nccl", 3, 1.0, [silent])
        deadline.call([silent], "receive_weights", {})
        start = time.monotonic()
        with pytest.raises(WeightSyncTimeout) as caught:
            deadline.run(threading.Event().wait, "the NCCL broadcast")
        assert time.monotonic() - start < 1.0 + 3.0
        assert caught.value.unanswered == [f"engine 0 (actor {_actor(silent)})"]
        assert "the NCCL broadcast" in str(caught.value)
    finally:
        ray.kill(silent)
    with pytest.raises(WeightSyncTimeout, match="the learner's side"):
        Deadline("nccl", 3, 0.5, []).run(threading.Event().wait, "the NCCL group's rendezvous")
    assert Deadline("nccl", 3, 5.0, []).run(lambda: 42, "a call") == 42
    with pytest.raises(ZeroDivisionError):
        Deadline("nccl", 3, 5.0, []).run(lambda: 1 / 0, "a call")


def test_nccl_sender_drives_vllms_trainer_engine_and_regroups_after_a_new_actor(local_ray, monkeypatch):
    """The NCCL transport on the installed vLLM (0.32: its trainer-side engine drives the update through our
    client), with vLLM's NCCL calls and CUDA stood in for: the group is built once, the engines see init,
    start, update and finish in order, and a replay after an engine was replaced by a new actor rebuilds the
    group, shutting down only the engine that stays (the replaced one's actor is gone)."""
    from vllm.distributed.weight_transfer import nccl_engine

    from actors.weight_sync import nccl

    class StandInTrainer:  # vLLM's NCCLTrainerWeightTransferEngine without NCCL: only its client calls
        @classmethod
        def trainer_init(cls, init: Any, client: Any, source: Any) -> StandInTrainer:
            assert init.is_sender and init.world_size == 3
            client.init_weight_transfer_engine({"master_address": init.master_address, "rank_offset": 1})
            trainer = cls()
            trainer.client, trainer.source = client, source
            return trainer

        def send_weights(self) -> None:
            names = [meta.name for meta in self.source.metadata()]
            self.client.start_weight_update()
            self.client.update_weights({"names": names, "dtype_names": [], "shapes": []})
            assert [name for name, _ in self.source] == names
            self.client.finish_weight_update()

    monkeypatch.setattr(nccl_engine, "NCCLTrainerWeightTransferEngine", StandInTrainer)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(nccl, "on_device", lambda weights, device: iter(list(weights)))
    engines = _stand_ins("answers", "answers")
    transport = nccl.NCCLTransport(bucket_bytes=1024, timeout_s=30.0, master_address="127.0.0.1")
    assert transport.push(engines, _weights, version=1).version == 1
    assert transport.push(engines, _weights, version=2).version == 2
    push = ["prepare", "receive", "finish None"]
    assert ray.get(engines[0].calls.remote()) == [
        "connect rank_offset=1",
        *push,
        "version 1",
        *push,
        "version 2",
    ]
    assert ray.get(engines[1].calls.remote())[0] == "connect rank_offset=2"
    ray.kill(engines[1])
    (new,) = _stand_ins("answers")
    assert transport.replay([new], [engines[0], new]).version == 2
    assert ray.get(engines[0].calls.remote())[-6:] == [
        "disconnect",
        "connect rank_offset=1",
        *push,
        "version 2",
    ]
    assert ray.get(new.calls.remote()) == ["connect rank_offset=2", *push, "version 2"]
    assert not transport.restart_in_place_supported and transport.replay_reads_source
    ray.kill(engines[0])
    ray.kill(new)


class RecordingLLM:
    """vLLM's `LLM` as a receiver sees it: records every `collective_rpc`."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def collective_rpc(self, method: str, kwargs: dict[str, Any] | None = None) -> list[None]:
        self.calls.append((method, kwargs or {}))
        return [None]


def test_native_receivers_drive_vllms_weight_transfer_and_set_a_new_vllm_up_again():
    """The vLLM calls of the IPC and NCCL receivers, in order; after a restart in place the IPC receiver sets the
    new vLLM up as the old one was, and an NCCL receiver that joined a group refuses the restart."""
    receiver, llm = IPCReceiver(), RecordingLLM()
    receiver.attach(llm)
    receiver.connect({"packed": True})
    receiver.prepare()
    receiver.receive({"names": ["w"]})
    receiver.finish()
    assert [m for m, _ in llm.calls] == [
        "init_weight_transfer_engine",
        "start_weight_update",
        "update_weights",
        "finish_weight_update",
    ]
    assert llm.calls[0][1] == {"init_info": {"packed": True}}  # vLLM 0.32 declares `packed` at init
    assert llm.calls[2][1] == {"update_info": {"names": ["w"]}}
    assert receiver.restart_obstacle() == ""
    restarted = RecordingLLM()
    receiver.attach(restarted)
    assert restarted.calls == [("init_weight_transfer_engine", {"init_info": {"packed": True}})]

    nccl = NCCLReceiver()
    nccl.attach(RecordingLLM())
    assert nccl.restart_obstacle() == ""  # no group joined yet
    nccl.connect({"master_address": "10.0.0.1", "master_port": 1, "world_size": 2, "rank_offset": 1})
    assert "NCCL group" in nccl.restart_obstacle()


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
