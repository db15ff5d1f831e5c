"""`veason sft CONFIG [key=value ...]`: CoT-SFT of the Qwen2.5-VL policy on `veason cot` records (docs/method.md
section 6) with Ray Train + DeepSpeed; the LoRA-merged HF folder it exports is what GRPO starts from and uses
as its reference model.

    records   sft.records (default <cot.output_dir or run.output_dir/cot>/cot.jsonl), in sample-key order, cut to sft.max_examples,
              a seeded sft.held_out_fraction held out
    before    greedy answers of the starting model (model.policy) to the held-out prompts: parse rate, format
              match, mean format reward (`veason_ray.answer_parsing`, `veason_ray.rewards`)
    train     `TorchTrainer` with learner.workers ranks (`pipelines/sft_worker.py`): loss on the assistant turn
              only (the answer then <|im_end|>), token mean over the global batch; sft.epochs x
              ceil(train / sft.batch_size) optimizer steps, seeded shuffles, sft.lr with sft.warmup_steps of
              linear warm-up then a cosine decay; the held-out NLL at every epoch's end
    export    <sft.output_dir>/hf (LoRA merged, learner.export_dtype)
    after     the same evaluation on the exported folder

Writes metrics.jsonl (one row per step), loss_curve.png, sft_summary.json (first with the "before" evaluation,
then complete) and config.yaml in sft.output_dir (a local folder) and prints the before/after table.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from pipelines import preflight
from pipelines.config_command import add_config_arguments, config_from_args
from pipelines.console import open_console, say
from pipelines.ray_runtime import init_ray
from pipelines.run_log import METRICS_FILE, SFT_CURVE_FILE, SFT_SUMMARY_FILE
from veason_ray.config import VeasonConfig
from veason_ray.config_loading import save_config
from veason_ray.cot.records import COT_FILE, read_jsonl, validate_record
from veason_ray.object_store import is_s3_uri, join_uri
from veason_ray.training.sft import FormatScore, split_held_out


def records_path(cfg: VeasonConfig) -> str:
    """sft.records, or the cot.jsonl `veason cot` writes with this config."""
    if cfg.sft.records:
        return cfg.sft.records
    return join_uri(cfg.cot.output_dir or join_uri(cfg.run.output_dir, "cot"), COT_FILE)


def output_dir(cfg: VeasonConfig) -> Path:
    out = cfg.sft.output_dir or join_uri(cfg.run.output_dir, "sft")
    if is_s3_uri(out):
        raise SystemExit(f"veason sft: sft.output_dir must be a local folder, got {out}")
    return Path(out).resolve()


def load_records(cfg: VeasonConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """(train records, held-out records, the folder their image paths are relative to)."""
    path = records_path(cfg)
    if is_s3_uri(path) or not Path(path).is_file():
        raise SystemExit(f"veason sft: no records at {path} (run `veason cot` first or set sft.records)")
    records = list(read_jsonl(path))
    for index, record in enumerate(records):
        try:
            validate_record(record)
        except ValueError as e:
            raise SystemExit(f"veason sft: {path} record {index}: {e}") from None
    # `veason cot` appends records as they finish, in no fixed order: sorted by sample key, the same seed gives
    # the same held-out split and batches on every run (records without our metadata keep their file order)
    records.sort(key=lambda record: str((record.get("veason") or {}).get("key", "")))
    if cfg.sft.max_examples > 0:
        records = records[: cfg.sft.max_examples]
    train, held = split_held_out(len(records), cfg.sft.held_out_fraction, cfg.run.seed)
    return [records[i] for i in train], [records[i] for i in held], str(Path(path).resolve().parent)


def evaluate_share(
    model_dir: str, records: list[dict[str, Any]], root: str, cfg: VeasonConfig
) -> FormatScore:
    """Greedy HF-generate answers of the model at `model_dir` to `records`' prompts, scored for format.
    bf16 (model.dtype) on a GPU, float32 on CPU."""
    import torch

    from veason_ray.cot.records import load_sft_example
    from veason_ray.models.hf_policy import HFPolicy
    from veason_ray.models.loading import load_policy
    from veason_ray.training.sft import generate_answers, score_answers

    on_gpu = torch.cuda.is_available()
    model, processor = load_policy(
        model_dir,
        dtype=getattr(torch, cfg.model.dtype) if on_gpu else torch.float32,
        device="cuda" if on_gpu else "cpu",
        attn_implementation=cfg.model.attn_implementation,
        storage=cfg.storage,
    )
    prompts = [load_sft_example(r, root, cfg.storage)[0] for r in records]
    answers = generate_answers(
        HFPolicy(model, processor), prompts, cfg.sft.eval_max_new_tokens, cfg.sft.eval_batch_size
    )
    return score_answers(answers, [r["veason"] for r in records])


def evaluate(model_dir: str, records: list[dict[str, Any]], root: str, cfg: VeasonConfig) -> FormatScore:
    """`evaluate_share` over learner.workers Ray tasks (each with a rank's GPU share), summed."""
    import ray

    records = records[: cfg.sft.eval_examples or None]
    if not records:
        return FormatScore(0, 0, 0, 0.0)
    shards = max(1, min(cfg.learner.workers, len(records)))
    task = ray.remote(num_cpus=cfg.learner.cpus_per_worker, num_gpus=cfg.learner.gpus_per_worker)(
        evaluate_share
    )
    refs = [task.remote(model_dir, records[i::shards], root, cfg) for i in range(shards)]
    total = FormatScore(0, 0, 0, 0.0)
    for score in ray.get(refs):
        total = total + score
    return total


def train(
    cfg: VeasonConfig, model_dir: str, train_records: list, held_out: list, root: str, out: Path
) -> Any:
    """Run the Ray Train job (`pipelines/sft_worker.train_loop` on every rank); its Result."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.sft_worker import train_loop

    learner = cfg.learner
    use_gpu = learner.gpus_per_worker > 0
    resources = {"CPU": learner.cpus_per_worker, **({"GPU": learner.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "cfg": cfg,
            "model_dir": model_dir,
            "train_records": train_records,
            "held_out_records": held_out,
            "records_root": root,
            "output_dir": str(out),
        },
        scaling_config=ScalingConfig(
            num_workers=learner.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=f"{cfg.run.name}-sft", storage_path=str(out / "ray_train")),
    )
    return trainer.fit()


def read_metrics(out: Path) -> list[dict[str, Any]]:
    return list(read_jsonl(out / METRICS_FILE))


def held_out_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The metrics rows that carry a held-out loss (epoch ends and the last step; NaN when it was not measured)."""
    return [r for r in rows if math.isfinite(r.get("eval_loss", math.nan))]


def write_curve(rows: list[dict[str, Any]], path: Path) -> str:
    """The loss per step (and the held-out parse rate where measured) as a PNG; a note of what was written."""
    if not rows:
        return "loss curve: no steps"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train NLL / answer token")
    held = held_out_rows(rows)
    if held:
        ax.plot([r["step"] for r in held], [r["eval_loss"] for r in held], "s-", label="held-out NLL")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats)")
    ax.set_yscale("log")
    evals = [r for r in rows if "eval_parse_rate" in r]
    if evals:
        twin = ax.twinx()
        twin.plot(
            [r["step"] for r in evals],
            [r["eval_parse_rate"] for r in evals],
            "o-",
            color="C1",
            label="held-out parse rate",
        )
        twin.set_ylabel("parse rate")
        twin.set_ylim(-0.02, 1.02)
    fig.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"loss curve: {path}"


def format_table(before: FormatScore, after: FormatScore) -> str:
    lines = [f"{'held-out prompts':<24}{'before':>10}{'after':>10}"]
    rows = (
        ("parse_rate", "%"),
        ("format_match_rate", "%"),
        ("format_reward_mean", ""),
        ("keyframe_in_prompt_rate", "%"),
        ("teacher_keyframe_rate", "%"),
        ("teacher_box_iou_mean", ""),
    )
    for name, unit in rows:
        b, a = getattr(before, name), getattr(after, name)
        cell = (lambda v: f"{v:.1%}") if unit == "%" else (lambda v: f"{v:.3f}")
        lines.append(f"{name:<24}{cell(b):>10}{cell(a):>10}")
    lines.append(f"{'examples':<24}{before.examples:>10}{after.examples:>10}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, "sft")
    open_console(cfg, "sft")
    preflight.check("sft", preflight.policy_problems(cfg))
    fine_tune(cfg)
    return 0


def fine_tune(cfg: VeasonConfig) -> dict[str, Any]:
    """Everything `veason sft` does after its checks: prints its lines, returns the summary it writes
    (`sft_summary.json`: records, before/after scores, losses, `export`)."""
    started = time.perf_counter()
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_FILE).unlink(missing_ok=True)  # a rerun starts a fresh curve
    save_config(cfg, out / "config.yaml")
    train_records, held_out, root = load_records(cfg)
    steps = cfg.sft.epochs * math.ceil(len(train_records) / max(cfg.sft.batch_size, 1))
    say(
        f"sft: {len(train_records)} training records, {len(held_out)} held out, about {steps} steps, "
        f"{cfg.learner.workers} ranks, {'LoRA' if cfg.learner.lora.enabled else 'full'} fine-tuning, "
        f"output {out}",
    )
    init_ray(cfg.placement)
    from veason_ray.models.loading import resolve_model_dir

    # Ray Train runs each rank in its own working directory: every path it gets is absolute.
    model_dir = str(resolve_model_dir(cfg.model.policy, cfg.storage, cfg.model.cache_dir or None).resolve())
    before = evaluate(model_dir, held_out, root, cfg)
    say(f"sft: before: parse rate {before.parse_rate:.1%} on {before.examples} held-out prompts")
    summary: dict[str, Any] = {
        "records": records_path(cfg),
        "train_examples": len(train_records),
        "held_out_examples": len(held_out),
        "before": before.as_dict(),
    }
    (out / SFT_SUMMARY_FILE).write_text(
        json.dumps(summary, indent=2) + "\n"
    )  # what is known if training dies
    result = train(cfg, model_dir, train_records, held_out, root, out)
    if result.error is not None:
        raise SystemExit(f"veason sft: training failed: {result.error}")
    export = out / "hf"
    after = evaluate(str(export), held_out, root, cfg)
    rows = read_metrics(out)
    note = write_curve(rows, out / SFT_CURVE_FILE)
    held_losses = [r["eval_loss"] for r in held_out_rows(rows)]
    summary.update(
        {
            "steps": len(rows),
            "first_loss": rows[0]["loss"] if rows else None,
            "final_loss": rows[-1]["loss"] if rows else None,
            "final_held_out_loss": held_losses[-1] if held_losses else None,
            "after": after.as_dict(),
            "export": str(export),
            "seconds": time.perf_counter() - started,
        }
    )
    (out / SFT_SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    say(format_table(before, after))
    say(
        f"sft: {len(rows)} steps, loss {summary['first_loss']} -> {summary['final_loss']}, "
        f"held-out loss {summary['final_held_out_loss']}"
    )
    say(f"  export    {export} (GRPO: model.policy={export})")
    say(f"  summary   {out / SFT_SUMMARY_FILE}\n  {note}")
    return summary
