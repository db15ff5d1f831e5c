"""The reload transport (CPU, and any machine): buckets go through Ray's object store; each engine unpacks them
and calls vLLM's in-place `reload_weights` (the CPU backend repacks weights, so a plain `load_weights` after
start-up does not work there).

    ReloadTransport  sender: packs the source into CPU buckets, puts each in the object store once (read by
                     every engine) and keeps their references, so a restarted engine is replayed without the
                     learner's help.
    ReloadReceiver   receiver: stages the unpacked tensors, then hands them to vLLM's worker as a file in shared
                     memory and reloads them in place.

Talks to: RolloutEngine actors (`actors/rollout.py`) through their generic weight methods, and vLLM's worker
(`collective_rpc`) on the receiving side.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import ray
import torch

from actors.weight_sync.interface import (
    Deadline,
    SyncReport,
    WeightReceiver,
    WeightSource,
    WeightTransport,
)
from veason_ray.weight_transport import WeightBucket, pack_buckets, unpack_bucket


class ReloadTransport(WeightTransport):
    """Buckets through the object store, loaded by vLLM's `reload_weights` (works on CPU and GPU)."""

    kind = "reload"
    replay_reads_source = False  # a replay re-sends the kept buckets

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._bucket_refs: list[ray.ObjectRef] = []

    def _send(
        self, engines: Sequence[Any], source: WeightSource, version: int, deadline: Deadline
    ) -> tuple[int, int]:
        refs, nbytes = [], 0
        for bucket in pack_buckets(source(), self.bucket_bytes, version):
            bucket.buffer = bucket.buffer.cpu()
            nbytes += bucket.nbytes
            refs.append(ray.put(bucket))  # put once, read by every engine
        self._load(engines, refs, deadline)
        self._bucket_refs = refs
        return nbytes, len(refs)

    def replay(self, engines: Sequence[Any], all_engines: Sequence[Any]) -> SyncReport | None:
        if not self._bucket_refs:
            return None
        start = time.perf_counter()
        self._load(engines, self._bucket_refs, self.deadline(self.version, engines))
        seconds = time.perf_counter() - start
        return SyncReport(self.kind, self.version, seconds, 0, len(self._bucket_refs), len(engines))

    @staticmethod
    def _load(engines: Sequence[Any], refs: list[ray.ObjectRef], deadline: Deadline) -> None:
        # An actor runs one caller's calls in order: queue every bucket at once (no round trip per bucket),
        # and load only once all arrived without error.
        calls = deadline.call(engines, "prepare_weights")
        calls += deadline.record([(e, e.receive_weights.remote(ref)) for ref in refs for e in engines])
        deadline.gather(calls, "the weight buckets")
        deadline.ask(engines, "finish_weights", deadline.version)


class ReloadReceiver(WeightReceiver):
    """Stages the buckets of a push and reloads them into vLLM in place at `finish`."""

    vllm_backend = "ipc"  # unused by this transport; what the engine is built with on a GPU all the same

    def attach(self, llm: Any) -> None:
        super().attach(llm)
        self._staged: list[tuple[str, Any]] = []

    def prepare(self) -> None:
        self._staged = []

    def receive(self, payload: WeightBucket) -> int:
        self._staged.extend(unpack_bucket(payload))
        return len(self._staged)

    def finish(self) -> None:
        """Load the staged tensors in place through vLLM's `reload_weights`. They reach vLLM's worker as a file in
        shared memory: with a separate engine core on CPU the worker is a third process and vLLM cannot pickle
        tensors it received zero-copy; a path crosses any process boundary."""
        staged, self._staged = with_tied_head(self._staged, self._ties_embeddings()), []
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.NamedTemporaryFile(dir=folder, prefix="veason_reload_", suffix=".pt") as file:
            torch.save(staged, file.name)
            self.llm.collective_rpc(reload_weights_from_file, args=(file.name,))

    def _ties_embeddings(self) -> bool:
        config = self.llm.llm_engine.model_config.hf_config
        text = getattr(config, "text_config", None)
        return bool(
            getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False)
        )


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
    worker.reload_weights(weights_iterator=torch.load(path, mmap=True, weights_only=True))
