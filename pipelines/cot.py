"""`veason cot CONFIG [key=value ...]`: chain-of-thought SFT records from a teacher VLM (docs/method.md section 6).

Reads the expressions of `cot.meta` (a `veason sample` output) or of the whole split (`cot.split`, default
`data.train_split`) under `data.root`, leaves out no-target expressions (type 2: no box to teach), builds each
sample (keyframe from the 5 largest-mask frames, up to `cot.num_frames` frames, red boxes on the teacher's
copies), asks the teacher (`cot.teacher`: `openai` = any OpenAI-compatible endpoint, `offline` = template CoT
from ground truth) and appends one record per sample to `<cot.output_dir>/cot.jsonl` as soon as it is done.
A sample that fails (bad data, request failed after its retries, unusable reply) gets a line in failures.jsonl
with its error. A rerun skips the samples already in cot.jsonl and does the rest: samples never tried and, with
`cot.retry_failed` (default), those whose last attempt failed; a rerun whose settings would change what a record
looks like (dataset, split, frames, teacher kind, seed) is refused rather than mixed in. Writes dataset_info.json
for LLaMA-Factory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import yaml

from pipelines.config_command import add_config_arguments, config_from_args
from pipelines.console import open_console, say
from pipelines.sample import meta_document_keys, select_records
from veason_ray.config import VeasonConfig
from veason_ray.config_loading import config_to_dict
from veason_ray.cot.client import ChatCompletionsClient, RetryPolicy, TeacherConfigError, TeacherEndpoint
from veason_ray.cot.jobs import FrameSpec, build_cot_job
from veason_ray.cot.offline_teacher import OfflineTeacher
from veason_ray.cot.output import CoTOutput, SettingsMismatchError
from veason_ray.cot.records import make_record
from veason_ray.cot.teacher import OpenAITeacher, Teacher, think_text
from veason_ray.cot.teacher_prompts import choose_template, teacher_instruction
from veason_ray.datasets import TYPE_NO_TARGET, ExpressionRecord, VOSDataset, open_dataset
from veason_ray.datasets.base import read_json
from veason_ray.object_store import join_uri, store_for
from veason_ray.sample_building import sample_key


@dataclass
class CoTSummary:
    """One run's counts: ``done``/``failed`` this run, ``skipped`` already done before, ``held_back`` failed
    before and not retried (cot.retry_failed off), ``excluded`` no-target expressions."""

    total: int
    excluded: int
    skipped: int
    held_back: int
    done: int = 0
    failed: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        return (
            f"cot: done {self.done}, failed {self.failed}, skipped {self.skipped} (already done), "
            f"held back {self.held_back} (failed before), excluded {self.excluded} (no target) "
            f"of {self.total} expressions in {self.seconds:.1f} s"
        )


def load_records(cfg: VeasonConfig) -> tuple[VOSDataset, list[ExpressionRecord]]:
    """The dataset split and the expressions to process (cot.meta's, or the split's), cut to cot.max_samples."""
    split = cfg.cot.split or cfg.data.train_split
    dataset = open_dataset(cfg.data.dataset, cfg.data.root, split, cfg.storage)
    if cfg.cot.meta:
        keys = meta_document_keys(read_json(store_for(cfg.cot.meta, cfg.storage), cfg.cot.meta), cfg.cot.meta)
        records = select_records(dataset, keys, cfg.cot.meta)
    else:
        records = list(dataset.expressions())
    if cfg.cot.max_samples > 0:
        records = records[: cfg.cot.max_samples]
    return dataset, records


def resolve_endpoint(cfg: VeasonConfig) -> TeacherEndpoint | None:
    """The teacher endpoint (None for the offline teacher); exits naming the missing field."""
    if cfg.cot.teacher == "offline":
        return None
    try:
        return TeacherEndpoint.resolve(cfg.cot.base_url, cfg.cot.model, cfg.cot.api_key)
    except TeacherConfigError as e:
        raise SystemExit(f"veason cot: {e}") from None


@contextlib.asynccontextmanager
async def open_teacher(cfg: VeasonConfig, endpoint: TeacherEndpoint | None) -> AsyncIterator[Teacher]:
    """The configured teacher (an OpenAI-compatible client is opened and closed around the block)."""
    c = cfg.cot
    if endpoint is None:
        yield OfflineTeacher()
        return
    retry = RetryPolicy(c.max_retries, c.timeout_s, c.backoff_base_s, c.backoff_max_s)
    async with ChatCompletionsClient(endpoint, retry, c.concurrency, seed=cfg.run.seed) as client:
        yield OpenAITeacher(client, c.max_tokens, c.temperature)


async def process_one(
    dataset: VOSDataset, record: ExpressionRecord, teacher: Teacher, output: CoTOutput, spec: FrameSpec
) -> bool:
    """Build, ask, write one sample: True for a record, False for a recorded failure (never raises for it)."""
    key = sample_key(record)
    try:
        job = await asyncio.to_thread(build_cot_job, dataset, record, spec)
        template = choose_template(spec.seed, key)
        instruction = teacher_instruction(
            record.expression, job.frame_indices, job.keyframe, len(job.boxes_560), template
        )
        reply = await teacher.write_cot(job, instruction)
        line = make_record(job, think_text(reply), teacher.name)
        await asyncio.to_thread(output.write_images, job)
        output.append_record(line)
        return True
    except Exception as e:  # every sample ends as a record or a recorded failure, whatever went wrong
        output.append_failure(key, e, teacher.name)
        return False


async def generate(
    dataset: VOSDataset,
    records: list[ExpressionRecord],
    teacher: Teacher,
    output: CoTOutput,
    spec: FrameSpec,
    summary: CoTSummary,
    concurrency: int,
    progress_every_s: float = 0.0,
) -> CoTSummary:
    """Process ``records`` with ``concurrency`` workers, counting into ``summary``; prints progress lines."""
    queue = list(reversed(records))
    started = time.perf_counter()

    async def worker() -> None:
        while queue:
            if await process_one(dataset, queue.pop(), teacher, output, spec):
                summary.done += 1
            else:
                summary.failed += 1

    async def progress() -> None:
        while True:
            await asyncio.sleep(progress_every_s)
            finished = summary.done + summary.failed
            rate = finished / max(time.perf_counter() - started, 1e-9)
            eta = (len(records) - finished) / rate if rate > 0 else float("inf")
            say(
                f"cot: {finished}/{len(records)} ({summary.done} records, {summary.failed} failed), "
                f"{rate:.2f} samples/s, eta {eta:.0f} s",
            )

    reporter = asyncio.create_task(progress()) if progress_every_s > 0 else None
    try:
        await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(records))))))
    finally:
        if reporter is not None:
            reporter.cancel()
    summary.seconds = time.perf_counter() - started
    return summary


def save_run_config(cfg: VeasonConfig, output_dir: str) -> None:
    """The resolved config next to the records (credentials redacted by `config_to_dict`)."""
    data = config_to_dict(cfg)
    store_for(output_dir).write_bytes(
        join_uri(output_dir, "config.yaml"), yaml.safe_dump(data, sort_keys=False).encode()
    )


def record_settings(cfg: VeasonConfig, spec: FrameSpec) -> dict[str, Any]:
    """What shapes a record's prompt and answer: a folder's records all share it (`CoTOutput` checks)."""
    return {
        "dataset": cfg.data.dataset,
        "split": cfg.cot.split or cfg.data.train_split,
        "teacher": cfg.cot.teacher,
        "num_frames": spec.num_frames,
        "keyframe_top_k": spec.keyframe_top_k,
        "frame_size": spec.frame_size,
        "seed": spec.seed,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, "cot")
    open_console(cfg, "cot")
    write_cot_records(cfg)
    return 0


def write_cot_records(cfg: VeasonConfig) -> CoTSummary:
    """Everything `veason cot` does once its config is loaded; prints its lines, returns the counts."""
    output_dir = cfg.cot.output_dir or join_uri(cfg.run.output_dir, "cot")
    endpoint = resolve_endpoint(cfg)
    dataset, records = load_records(cfg)
    spec = FrameSpec(
        num_frames=cfg.cot.num_frames,
        keyframe_top_k=cfg.data.keyframe_top_k,
        frame_size=cfg.data.frame_size,
        teacher_max_size=(cfg.cot.max_image_width, cfg.cot.max_image_height),
        box_thickness=cfg.cot.box_thickness,
        seed=cfg.run.seed,
        video_format=cfg.data.video_format,
        video_backend=cfg.data.video_backend,
    )
    try:
        output = CoTOutput(output_dir, record_settings(cfg, spec))
    except SettingsMismatchError as e:
        raise SystemExit(f"veason cot: {e}") from None
    save_run_config(cfg, output_dir)
    output.write_dataset_info()
    usable = [r for r in records if r.type_id != TYPE_NO_TARGET]
    keys = [sample_key(r) for r in usable]
    pending = set(output.pending(keys, cfg.cot.retry_failed))
    todo = [r for r, k in zip(usable, keys, strict=True) if k in pending]
    skipped = sum(k in output.done for k in keys)
    summary = CoTSummary(len(records), len(records) - len(usable), skipped, len(keys) - skipped - len(todo))
    say(f"cot: {len(todo)} samples to do, teacher {cfg.cot.teacher}, output {output_dir}")

    async def main() -> CoTSummary:
        async with open_teacher(cfg, endpoint) as teacher:
            return await generate(
                dataset, todo, teacher, output, spec, summary, cfg.cot.concurrency, cfg.cot.progress_every_s
            )

    try:
        asyncio.run(main())
    finally:
        output.close()
    say(summary.line())
    say(f"  records   {output.records_path} ({len(output.done)} in all)")
    say(f"  failures  {output.failures_path} ({len(output.last_failure)} samples whose last attempt failed)")
    say(f"  dataset   {output.root / 'dataset_info.json'} (LLaMA-Factory: dataset veason_cot)")
    return summary
