"""One Ray Train rank of `veason sft`: the DeepSpeed engine over the policy, the seeded step schedule with its
warm-up + cosine learning rate, the token-mean NLL of the answers, the held-out NLL at every epoch's end (training
NLL falling while this one rises is memorisation), optional parse-rate checks, and the LoRA-merged HF export.

Ray Train (`ray.train.torch.TorchTrainer`) has set up torch.distributed (NCCL on GPUs, gloo on CPU) before
`train_loop` runs; DeepSpeed joins that group. Every rank reads the same records and schedule and takes its
round-robin share of each global batch; ranks run the same number of micro-batches (empty ones where a rank
is short), one optimizer step per global batch. Rank 0 writes `metrics.jsonl`, prints one line per step and
writes the exported folder (all ranks take part in gathering the weights).
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from pipelines.console import say
from pipelines.sft import METRICS_FILE
from veason_ray.config import VeasonConfig
from veason_ray.cot.records import load_sft_example
from veason_ray.cpu_torch_workarounds import skip_deepspeed_shm_build
from veason_ray.training.sft import (
    FormatScore,
    empty_like,
    generate_answers,
    rank_share,
    score_answers,
    sft_sequence,
    step_schedule,
    summed_nll,
    warmup_cosine,
)


def _all_reduce(values: list[float], op: str = "sum") -> list[float]:
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor.cpu().tolist()


class SFTRank:
    """The state of one rank: engine, processor, records and where it writes."""

    def __init__(self, params: dict[str, Any], rank: int, world_size: int, on_gpu: bool) -> None:
        from transformers import AutoProcessor

        from veason_ray.training.deepspeed_engine import build_engine, load_trainable_policy

        self.cfg: VeasonConfig = params["cfg"]
        self.records: list[dict[str, Any]] = params["train_records"]
        self.held_out: list[dict[str, Any]] = params["held_out_records"]
        self.root: str = params["records_root"]
        self.out_dir = Path(params["output_dir"])
        self.rank, self.world_size = rank, world_size
        sft = self.cfg.sft
        # The learner's engine settings with SFT's optimisation ones (lr, warm-up, clip).
        self.learner = replace(
            self.cfg.learner, lr=sft.lr, warmup_steps=sft.warmup_steps, grad_clip=sft.grad_clip
        )
        self.model_dir = model_dir = params["model_dir"]
        self._local = threading.local()
        self.processor = AutoProcessor.from_pretrained(model_dir)
        tokenizer = self.processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # The optimizer steps (each a list of record positions) and the lr along them: warm-up, then cosine.
        self.schedule = step_schedule(
            len(self.records), sft.batch_size, sft.epochs, self.cfg.run.seed, min_batch=world_size
        )
        warmup, total = sft.warmup_steps, len(self.schedule)
        policy = load_trainable_policy(model_dir, self.learner, self.cfg.model.attn_implementation)
        self.engine = build_engine(
            policy, self.learner, on_gpu, lr_multiplier=lambda step: warmup_cosine(step, warmup, total)
        )
        self.device = next(self.engine.module.parameters()).device
        # JPEG decode + image preprocessing of the next step run on this rank's CPUs while the step runs.
        self.pool = ThreadPoolExecutor(max_workers=max(2, int(self.cfg.learner.cpus_per_worker)))
        self._held_out_sequences: list[Any] | None = None

    def encode(self, positions: list[int], records: list[dict[str, Any]] | None = None) -> list[Future]:
        """The sequences of the records (default: the training records) at `positions`, each encoded in the
        background."""
        from transformers import AutoProcessor

        records = self.records if records is None else records

        def work(index: int) -> Any:
            # One processor per thread: a fast tokenizer shared across threads can fail ("Already borrowed").
            processor = getattr(self._local, "processor", None)
            if processor is None:
                processor = self._local.processor = AutoProcessor.from_pretrained(self.model_dir)
            record = records[index]
            return sft_sequence(processor, *load_sft_example(record, self.root, self.cfg.storage))

        return [self.pool.submit(work, i) for i in positions]

    def step(self, sequences: list[Any]) -> dict[str, float]:
        """One optimizer step over this rank's `sequences`; the global batch's loss and counts."""
        from veason_ray.training.policy_forward import response_logprobs
        from veason_ray.training.sequences import collate, split_micro_batches

        start = time.perf_counter()
        self.engine.module.train()
        chunks = split_micro_batches(sequences, self.learner.micro_batch_size)
        local_tokens = float(sum(int(s.response_ids.numel()) for s in sequences))
        tokens, examples = _all_reduce([local_tokens, float(len(sequences))])
        (count,) = _all_reduce([float(len(chunks))], op="max")
        while len(chunks) < count:
            chunks.append([empty_like(sequences[0])])
        nll = 0.0
        for index, chunk in enumerate(chunks):
            # Gradients accumulate until the last micro-batch; there they are reduced and the step taken.
            self.engine.set_gradient_accumulation_boundary(index == len(chunks) - 1)
            batch = collate(chunk, self.pad_id).to(self.device)
            logprobs, _ = response_logprobs(self.engine, batch)
            loss = summed_nll(logprobs, batch.response_mask, tokens)
            # DeepSpeed averages gradients over ranks; the global token mean wants their sum.
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            nll += float(loss.detach()) * tokens
        lr = float(self.engine.get_lr()[0])  # this step's: the scheduler moves on inside `step`
        self.engine.step()
        (nll,) = _all_reduce([nll])
        grad_norm = self.engine.get_global_grad_norm()
        return {
            "loss": nll / max(tokens, 1.0),
            "tokens": tokens,
            "examples": examples,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": lr,
            "seconds": time.perf_counter() - start,
        }

    @torch.no_grad()
    def held_out_loss(self) -> float:
        """Teacher-forced token-mean NLL of the held-out answers (the first sft.eval_examples; all ranks
        together); NaN when there are fewer held-out records than ranks."""
        from veason_ray.training.policy_forward import response_logprobs
        from veason_ray.training.sequences import collate, split_micro_batches

        records = self.held_out[: self.cfg.sft.eval_examples or None]
        if len(records) < self.world_size:
            return float("nan")
        if self._held_out_sequences is None:
            mine = rank_share(range(len(records)), self.rank, self.world_size)
            self._held_out_sequences = [f.result() for f in self.encode(mine, records)]
        sequences = self._held_out_sequences
        chunks = split_micro_batches(sequences, self.learner.micro_batch_size)
        (count,) = _all_reduce([float(len(chunks))], op="max")
        while len(chunks) < count:  # every rank runs as many forwards (ZeRO-3 gathers collectively)
            chunks.append([empty_like(sequences[0])])
        self.engine.module.eval()
        nll, tokens = 0.0, 0.0
        for chunk in chunks:
            batch = collate(chunk, self.pad_id).to(self.device)
            logprobs, _ = response_logprobs(self.engine, batch)
            nll += float(summed_nll(logprobs, batch.response_mask, 1.0))
            tokens += float(batch.response_mask.sum())
        self.engine.module.train()
        nll, tokens = _all_reduce([nll, tokens])
        return nll / max(tokens, 1.0)

    @torch.no_grad()
    def evaluate(self) -> FormatScore:
        """Greedy answers of the policy being trained on this rank's share of the held-out records, summed
        over ranks (ZeRO-0/1/2: every rank holds the whole model)."""
        from veason_ray.models.hf_policy import HFPolicy
        from veason_ray.training.policy_forward import causal_lm

        sft = self.cfg.sft
        records = self.held_out[: sft.eval_examples or None]
        mine = [records[i] for i in rank_share(range(len(records)), self.rank, self.world_size)]
        prompts = [load_sft_example(r, self.root, self.cfg.storage)[0] for r in mine]
        padding_side = self.processor.tokenizer.padding_side
        policy = HFPolicy(causal_lm(self.engine), self.processor)  # sets eval mode; LoRA layers stay active
        answers = generate_answers(policy, prompts, sft.eval_max_new_tokens, sft.eval_batch_size)
        score = score_answers(answers, [r["veason"] for r in mine])
        self.processor.tokenizer.padding_side = padding_side
        self.engine.module.train()
        return FormatScore.from_counts(_all_reduce(score.counts()))

    def export(self) -> Path:
        from veason_ray.training.policy_weights import export_hf_folder

        dtype = getattr(torch, self.learner.export_dtype)
        return export_hf_folder(self.engine, self.processor, self.out_dir / "hf", dtype, write=self.rank == 0)


def _log(rank: int, path: Path, row: dict[str, Any], wandb_run: Any) -> None:
    if rank != 0:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    if wandb_run is not None:
        wandb_run.log({k: v for k, v in row.items() if isinstance(v, int | float)}, step=row["step"])


def _open_wandb(cfg: VeasonConfig, out_dir: Path) -> Any:
    """A wandb run on rank 0 per trainer.wandb (offline by default); None when disabled."""
    settings = cfg.trainer.wandb
    if settings.mode == "disabled":
        return None
    import wandb

    return wandb.init(
        project=settings.project,
        entity=settings.entity or None,
        mode=settings.mode,
        name=f"{cfg.run.name}-sft",
        dir=str(out_dir),
        config={"sft": vars(cfg.sft), "learner_lr": cfg.sft.lr},
    )


def train_loop(params: dict[str, Any]) -> None:
    """The Ray Train function of every rank (see the module docstring)."""
    import deepspeed
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    cfg: VeasonConfig = params["cfg"]
    on_gpu = torch.cuda.is_available() and cfg.learner.gpus_per_worker > 0
    if on_gpu:
        torch.cuda.set_device(ray.train.torch.get_device())
    skip_deepspeed_shm_build()
    deepspeed.init_distributed(
        dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False, verbose=False
    )
    torch.manual_seed(cfg.run.seed + rank)
    built = time.perf_counter()
    worker = SFTRank(params, rank, world_size, on_gpu)
    if rank == 0:
        say(f"sft: {world_size} rank(s) ready, engine built in {time.perf_counter() - built:.0f} s")
    sft = cfg.sft
    schedule = worker.schedule
    metrics_path = worker.out_dir / METRICS_FILE
    wandb_run = _open_wandb(cfg, worker.out_dir) if rank == 0 else None
    steps_per_epoch = len(schedule) // max(sft.epochs, 1)
    # ZeRO-3 partitions the weights: generation would gather them collectively with ranks out of step.
    evaluate_every = sft.eval_every if worker.learner.zero_stage < 3 else 0
    if rank == 0 and sft.eval_every and not evaluate_every:
        say("sft: sft.eval_every is ignored under ZeRO-3 (the parse rate is measured before and after)")
    pending = worker.encode(rank_share(schedule[0], rank, world_size)) if schedule else []
    started = time.perf_counter()
    for step in range(1, len(schedule) + 1):
        sequences = [future.result() for future in pending]
        if step < len(schedule):
            pending = worker.encode(rank_share(schedule[step], rank, world_size))
        row: dict[str, Any] = {
            "step": step,
            "epoch": (step - 1) // max(steps_per_epoch, 1),
            **worker.step(sequences),
        }
        last = step == len(schedule)
        evaluate_now = evaluate_every and (step % evaluate_every == 0 or last) and worker.held_out
        if evaluate_now or step % max(steps_per_epoch, 1) == 0 or last:
            row["eval_loss"] = worker.held_out_loss()
        if evaluate_now:
            row.update({f"eval_{k}": v for k, v in worker.evaluate().as_dict().items()})
        _log(rank, metrics_path, row, wandb_run)
        if rank == 0:
            extra = f", held-out loss {row['eval_loss']:.4f}" if "eval_loss" in row else ""
            extra += f", parse {row['eval_parse_rate']:.0%}" if "eval_parse_rate" in row else ""
            say(
                f"sft step {step}/{len(schedule)} epoch {row['epoch']}: loss {row['loss']:.4f}, "
                f"grad_norm {row['grad_norm']:.3f}, lr {row['lr']:.2e}, {int(row['tokens'])} tokens, "
                f"{row['seconds']:.2f} s ({time.perf_counter() - started:.0f} s in){extra}"
            )
        # Only at epoch ends and the last step (the rows with a held-out loss): Ray Train V2's report is a
        # ~1.5 s barrier, longer than a small model's step.
        if "eval_loss" in row:
            ray.train.report({k: v for k, v in row.items() if isinstance(v, int | float)})
    worker.export()
    if wandb_run is not None:
        wandb_run.finish()
