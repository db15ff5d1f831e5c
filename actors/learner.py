"""The DeepSpeed learner: `learner.workers` Ray actors that form one torch.distributed group (NCCL on GPUs,
gloo on CPU) and train the Qwen2.5-VL policy with ZeRO-2/3 on GRPO batches.

    LearnerWorker  one rank: the DeepSpeed engine (`veason_ray/training/deepspeed_engine.py`), the frozen
                   reference, the processor that encodes prompts as the rollout engine does, and the GRPO
                   update (`veason_ray/training/grpo_update.py`). Rank 0 also holds the weight transport.
    LearnerGroup   the driver's handle: splits a batch over the ranks, runs the update, streams weights to
                   the rollout pool (it is the pool's weight sender), saves / resumes / exports.

Why an actor group and not Ray Train's TorchTrainer: a GRPO learner is called by the driver between the
phases of every step (reference log-probs, update, weight push while the engines wake) and must keep its
state (optimizer, weights) in GPU memory between those calls; TorchTrainer runs one training function to
completion and reports through its own loop. The SFT job (`pipelines/sft.py`) is that shape and uses Ray
Train; both share the training code of `veason_ray/training/`.

Talks to: the driver (pipelines/), the rollout engines (weights, through the transport of
`actors/weight_sync/`), the object store (checkpoints, exports).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray

from actors.network import free_port
from actors.weight_sync import SyncReport, make_transport
from veason_ray.config import VeasonConfig
from veason_ray.contiguous_split import contiguous_slices
from veason_ray.object_store import is_s3_uri, join_uri, store_for
from veason_ray.records import TrainItem
from veason_ray.training.checkpoint import (
    latest_complete,
    load_engine_state,
    mark_complete,
    save_engine_state,
)
from veason_ray.training.grpo_update import combine_metrics, loss_normalizer, plan_micro_batches
from veason_ray.weight_transport import WeightChecksum


class LearnerWorker:
    """One rank of the learner group."""

    def __init__(self, cfg: VeasonConfig, rank: int, world_size: int) -> None:
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self._sequences: list[Any] = []
        self.transport = None

    def rendezvous(self) -> tuple[str, int]:
        """This node's address and a free port, for rank 0 to host the process group."""
        return ray.util.get_node_ip_address(), free_port()

    def read_models(self, model_dir: str, reference_dir: str, ranks_on_node: int = 1) -> float:
        """The CPU part of set-up, which may run while another pool starts on this node's GPU: the processor,
        the policy and the reference read into CPU memory. `model_dir` / `reference_dir`: local folders, or s3://
        URIs or hub ids resolved here, on this rank's node (fetched once per node into `model.cache_dir`).
        `ranks_on_node`: the learner ranks sharing this node's cores for `learner.optimizer_threads=0`. Returns
        its seconds."""
        start = time.perf_counter()
        threads = self.cfg.learner.optimizer_threads or max(1, len(os.sched_getaffinity(0)) // ranks_on_node)
        if self.cfg.learner.offload_optimizer:  # else the CPU threads Ray gave this actor (num_cpus) stay
            # Ray set OMP_NUM_THREADS to this actor's num_cpus; DeepSpeedCPUAdam's OpenMP runtime reads it when
            # its extension loads (in setup's build_engine), torch's intra-op pool from set_num_threads.
            os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch
        from transformers import AutoProcessor

        from veason_ray.models.loading import resolve_model_dir
        from veason_ray.training.deepspeed_engine import load_frozen_policy, load_trainable_policy
        from veason_ray.training.packed_attention import enable_packed_attention

        if self.cfg.learner.offload_optimizer:
            torch.set_num_threads(threads)
        torch.manual_seed(self.cfg.run.seed + self.rank)
        learner = self.cfg.learner
        attn = self.cfg.model.attn_implementation
        cache = self.cfg.model.cache_dir or None
        model_dir = str(resolve_model_dir(model_dir, self.cfg.storage, cache))
        reference_dir = str(resolve_model_dir(reference_dir, self.cfg.storage, cache))
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self._policy = load_trainable_policy(model_dir, learner, attn)
        self._reference: Any = None
        if learner.loss.kl_coef > 0:
            same = Path(reference_dir).resolve() == Path(model_dir).resolve()
            if learner.lora.enabled and same:
                self._reference = "adapters-off"
            else:
                self._reference = load_frozen_policy(
                    reference_dir, learner.bf16, torch.device("cpu"), attn, learner.fused_elementwise
                )
        if learner.micro_batch_tokens > 0 or learner.attention_bucket_tokens > 0:
            for model in (self._policy, self._reference):
                if isinstance(model, torch.nn.Module):
                    enable_packed_attention(model)
        return time.perf_counter() - start

    def setup(self, master_addr: str, master_port: int) -> dict[str, Any]:
        """The rest of set-up, after `read_models`: join the process group, build the DeepSpeed engine on this
        rank's device (the GPU memory it takes from here on), move the reference there, and the weight
        transport."""
        import deepspeed
        import torch

        from veason_ray.cpu_torch_workarounds import skip_deepspeed_shm_build
        from veason_ray.training.deepspeed_engine import build_engine
        from veason_ray.training.grpo_update import GRPOUpdater
        from veason_ray.training.sequences import vision_token_ids

        start = time.perf_counter()
        self.on_gpu = torch.cuda.is_available()
        os.environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK="0",  # Ray gives each worker its own visible GPU(s)
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
        )
        if self.on_gpu:
            torch.cuda.set_device(0)
        phases = {}  # seconds of each part, for the driver's start-up split
        mark = time.perf_counter()
        skip_deepspeed_shm_build()
        deepspeed.init_distributed(
            dist_backend="nccl" if self.on_gpu else "gloo",
            auto_mpi_discovery=False,
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=self.rank,
            world_size=self.world_size,
            verbose=False,
        )
        learner = self.cfg.learner
        phases["process_group_s"], mark = time.perf_counter() - mark, time.perf_counter()
        self.engine = build_engine(self._policy, learner, self.on_gpu)
        phases["engine_s"], mark = time.perf_counter() - mark, time.perf_counter()
        device = next(self.engine.module.parameters()).device
        reference = self._reference
        if isinstance(reference, torch.nn.Module):
            reference = reference.to(device)
        phases["reference_s"] = time.perf_counter() - mark
        self._policy = self._reference = None  # the engine and the updater hold them now
        tokenizer = self.processor.tokenizer
        forbidden = vision_token_ids(tokenizer)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.updater = GRPOUpdater(self.engine, reference, learner, pad_id, forbidden, self.world_size)
        # Every rank builds the transport (whether a replay reads the weights again); only rank 0 sends.
        self.transport = make_transport(
            self.cfg.rollout.weight_transport,
            int(self.cfg.rollout.weight_bucket_mb * 2**20),
            ranks_per_engine=self.cfg.rollout.tensor_parallel_size,
            colocated=self.cfg.placement.mode == "colocated",
            timeout_s=self.cfg.rollout.weight_sync_timeout_s,
        )
        trainable = sum(p.numel() for p in self.engine.module.parameters() if p.requires_grad)
        seconds = time.perf_counter() - start
        return {"rank": self.rank, "seconds": seconds, "trainable_params": trainable, **phases}

    # ---- batches ----

    def prepare(self, items: Sequence[TrainItem]) -> dict[str, float]:
        """Encode this rank's share (each group's prompt once) and keep it for the calls that follow."""
        import torch

        from veason_ray.training.sequences import PolicySequence, encode_prompt

        prompts: dict[int, Any] = {}
        sequences = []
        for item in items:
            group = item.group
            if group.group_id not in prompts:
                frames = group.sample.resolve_frames(ray.get)
                prompts[group.group_id] = encode_prompt(self.processor, group.sample.messages(frames))
            sequences.append(
                PolicySequence(
                    prompt=prompts[group.group_id],
                    response_ids=torch.tensor(item.token_ids, dtype=torch.long),
                    advantage=float(item.advantage),
                    old_logprobs=torch.tensor(item.logprobs, dtype=torch.float32) if item.logprobs else None,
                )
            )
        self._sequences = sequences
        cfg = self.cfg.learner
        return {
            "micro_batches": len(plan_micro_batches(sequences, cfg)),
            "normalizer": loss_normalizer(sequences, cfg.loss.aggregation, self.updater.forbidden_ids),
        }

    def update(self, micro_batches: int, normalizer: float) -> dict[str, float]:
        return self.updater.update(self._sequences, micro_batches, normalizer)

    def logprobs(self, micro_batches: int, which: str) -> list[list[float]]:
        return [t.tolist() for t in self.updater.logprobs(self._sequences, micro_batches, which)]

    # ---- weights out ----

    def _weights(self) -> Any:
        import torch

        from veason_ray.training.policy_weights import named_weights

        dtype = getattr(torch, self.cfg.model.dtype)
        return lambda: named_weights(self.engine, dtype)

    def push_weights(self, engines: Sequence[Any], version: int) -> SyncReport | None:
        """Rank 0 sends the gathered weights to `engines`; the other ranks take part in ZeRO-3's gathers."""
        if self.rank == 0:
            return self.transport.push(engines, self._weights(), version)
        self._join_gathers()
        return None

    def replay_weights(self, engines: Sequence[Any], all_engines: Sequence[Any]) -> SyncReport | None:
        """Re-send the latest weights to restarted engines (the reload transport resends its kept buckets;
        IPC and NCCL read the weights again, so the other ranks join the gathers)."""
        if self.rank == 0:
            return self.transport.replay(engines, all_engines)
        if self.transport.replay_reads_source:
            self._join_gathers()
        return None

    def weight_checksum(self) -> WeightChecksum | None:
        """Rank 0: the checksum of the weights the engines would receive (all ranks walk the gathers)."""
        if self.rank == 0:
            # Not `checksum_weights`: it skips tensors by storage address, and these copies are freed one by
            # one, so a later copy can reuse an address; named_weights already yields tied weights once.
            checksum = WeightChecksum()
            for name, tensor in self._weights()():
                checksum.add(name, tensor)
            return checksum
        self._join_gathers()
        return None

    def _join_gathers(self) -> None:
        if self.cfg.learner.zero_stage == 3:
            for _ in self._weights()():
                pass

    def device_memory(self, reset: bool = True) -> dict[str, float]:
        """Peak GPU memory (GiB) allocated / reserved by this rank since the last reset; {} on CPU."""
        import torch

        if not self.on_gpu:
            return {}
        stats = {
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        }
        if reset:
            torch.cuda.reset_peak_memory_stats()
        return stats

    # ---- checkpoints ----

    def save(self, root: str, step: int) -> str:
        return save_engine_state(self.engine, root, step, self.rank, self.cfg.storage)

    def load(self, uri: str) -> int:
        return load_engine_state(self.engine, uri, self.rank, self.cfg.storage)

    def export(self, uri: str) -> str:
        """Every rank gathers; rank 0 writes the HF folder (locally, or staged then uploaded to s3://)."""
        import tempfile

        import torch

        from veason_ray.training.policy_weights import export_hf_folder

        dtype = getattr(torch, self.cfg.learner.export_dtype)
        remote = is_s3_uri(uri)
        local = Path(tempfile.mkdtemp(prefix="veason_export_")) if remote else Path(uri)
        export_hf_folder(self.engine, self.processor, local, dtype, write=self.rank == 0)
        if remote and self.rank == 0:
            store_for(uri, self.cfg.storage).upload_tree(local, uri)
        return uri


class LearnerGroup:
    """`learner.workers` LearnerWorker actors forming one process group; the rollout pool's weight sender."""

    def __init__(
        self,
        cfg: VeasonConfig,
        model_dir: str,
        reference_dir: str | None = None,
        scheduling: Sequence[dict[str, Any]] | None = None,
        defer_device: bool = False,
    ) -> None:
        """`scheduling`: per rank, Ray scheduling options (e.g. its placement-group bundle). The ranks load the
        models into CPU memory at once; they take their GPUs now, or (`defer_device`) when the caller calls
        `start_device_setup`, and the group is usable after `wait_ready`."""
        self.cfg = cfg
        learner = cfg.learner
        world = learner.workers
        actor_cls = ray.remote(num_cpus=learner.cpus_per_worker, num_gpus=learner.gpus_per_worker)(
            LearnerWorker
        )
        quiet = {"runtime_env": {"env_vars": {"TQDM_DISABLE": "1"}}}
        options = list(scheduling or [{}] * world)
        self.workers = [
            actor_cls.options(**quiet, **options[rank]).remote(cfg, rank, world) for rank in range(world)
        ]
        places = self._gather(
            [w.rendezvous.remote() for w in self.workers], "rendezvous"
        )  # (node address, a free port)
        self._master = places[0]
        nodes = [node for node, _ in places]
        reference = reference_dir or cfg.model.reference or model_dir
        self._started = time.perf_counter()
        # Actor calls run in order: each rank's setup (GPU) starts once its read_models (CPU) is done.
        self._loads = [
            w.read_models.remote(str(model_dir), str(reference), nodes.count(node))
            for w, node in zip(self.workers, nodes, strict=True)
        ]
        self._setups: list[Any] = []
        self.load_seconds = self.setup_seconds = 0.0
        self.setup_info: list[dict[str, Any]] = []
        if not defer_device:
            self.wait_ready()

    def start_device_setup(self) -> None:
        """Let the ranks take their GPUs: the process group, the DeepSpeed engine, the reference on the device.
        With `defer_device`, the caller says when (after a colocated engine has sized its memory)."""
        if not self._setups:
            self._setups = [w.setup.remote(*self._master) for w in self.workers]

    def wait_ready(self) -> None:
        """Waits for every rank's model reading and device set-up (started here if it was not)."""
        self.start_device_setup()
        self.load_seconds = max(self._gather(self._loads, "read_models"))
        self.setup_info = self._gather(self._setups, "setup")
        self.setup_seconds = time.perf_counter() - self._started

    def _gather(self, calls: list[Any], what: str) -> list[Any]:
        """Every rank's answer to its call `what`, each within `learner.timeout_s`; a rank that does not answer
        in time fails the call naming the ranks still out (a hung collective otherwise blocks forever)."""
        timeout = self.cfg.learner.timeout_s
        _, pending = ray.wait(calls, num_returns=len(calls), timeout=timeout)
        if pending:
            late = [rank for rank, call in enumerate(calls) if call in pending]
            raise TimeoutError(
                f"learner {what}: rank(s) {late} did not answer within learner.timeout_s={timeout:g} s"
            )
        return ray.get(calls)

    # ---- batches ----

    def _split(self, items: Sequence[TrainItem]) -> list[list[TrainItem]]:
        """Contiguous shares, sizes differing by at most one (a group's responses stay together where the
        sizes allow, so each rank encodes few prompts)."""
        world = len(self.workers)
        if len(items) < world:
            raise ValueError(f"{len(items)} sequences cannot be split over learner.workers={world} ranks")
        return [list(items[share]) for share in contiguous_slices(len(items), world)]

    def _prepare(self, items: Sequence[TrainItem]) -> tuple[int, float]:
        infos = self._gather(
            [w.prepare.remote(share) for w, share in zip(self.workers, self._split(items), strict=True)],
            "prepare",
        )
        return max(int(i["micro_batches"]) for i in infos), sum(i["normalizer"] for i in infos)

    def update(self, items: Sequence[TrainItem]) -> dict[str, float]:
        """One GRPO optimizer step on `items`; the batch's metrics."""
        count, normalizer = self._prepare(items)
        return combine_metrics(
            self._gather([w.update.remote(count, normalizer) for w in self.workers], "update")
        )

    def logprobs(self, items: Sequence[TrainItem], which: str = "policy") -> list[list[float]]:
        """Per item, the log-probs of its response tokens under the current policy or the reference."""
        count, _ = self._prepare(items)
        return [
            lp
            for part in self._gather([w.logprobs.remote(count, which) for w in self.workers], "logprobs")
            for lp in part
        ]

    def device_memory(self) -> list[dict[str, float]]:
        """Per rank, peak GPU memory since the last call (GiB)."""
        return self._gather([w.device_memory.remote() for w in self.workers], "device_memory")

    # ---- weights: the rollout pool's sender ----

    def push(self, engines: Sequence[Any], version: int) -> SyncReport:
        return self._gather([w.push_weights.remote(list(engines), version) for w in self.workers], "push")[0]

    def weight_checksum(self) -> WeightChecksum:
        return self._gather([w.weight_checksum.remote() for w in self.workers], "weight_checksum")[0]

    def replay(self, engines: Sequence[Any], all_engines: Sequence[Any]) -> SyncReport | None:
        calls = [w.replay_weights.remote(list(engines), list(all_engines)) for w in self.workers]
        return self._gather(calls, "replay")[0]

    # ---- checkpoints ----

    def save(self, root: str, step: int, parts: dict[str, bytes] | None = None) -> str:
        """Checkpoint `step` under `root`: every rank's state, then `parts` (name -> bytes, e.g. the driver's
        state), then the COMPLETE marker. Returns the checkpoint's URI."""
        uri = self._gather([w.save.remote(root, step) for w in self.workers], "save")[0]
        store = store_for(uri, self.cfg.storage)
        for name, data in (parts or {}).items():
            store.write_bytes(join_uri(uri, name), data)
        mark_complete(uri, {"step": step, "time": time.time()}, self.cfg.storage)
        return uri

    def load(self, uri: str) -> int:
        steps = self._gather([w.load.remote(uri) for w in self.workers], "load")
        return steps[0]

    def latest_checkpoint(self, root: str) -> str | None:
        return latest_complete(root, self.cfg.storage)

    def export(self, uri: str) -> str:
        """The policy as a Hugging Face folder (LoRA merged) at a local path or s3://."""
        return self._gather([w.export.remote(uri) for w in self.workers], "export")[0]

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        self.workers = []
