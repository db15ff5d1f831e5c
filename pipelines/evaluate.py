"""`veason eval`: a policy checkpoint on a benchmark split (ReVOS, MeViS, ReasonVOS, ViCaS; local or s3://), as
one Ray Data job over the split's videos (the stages are in pipelines/eval_stages.py):

    videos -> PolicyViewReader -> PolicyAnswerer (vLLM engines) -> FrameReader -> MaskPredictor (SAM2) ->
    ExpressionScorer -> results.jsonl, one line per expression as it finishes

Each expression is evaluated once across all the engines and GPUs given. A rerun into the same folder skips
the expressions already in results.jsonl (a crashed or preempted run resumes; with `eval.retry_failed`, failed
ones are tried again). A failing expression (corrupt video, engine error) is a result with its `error`, counted
apart and kept out of the means. Outputs in `eval.output_dir`: results.jsonl, summary.json and summary.md
(exactly the benchmark's subsets; ViCaS adds its LG-VIS track mAP), masks/<video>/<exp_id>/<frame>.png (the
public evaluation tools' layout), overlays/ (videos of `eval.overlays` and of `eval.worst_overlays` low-J&F
expressions, the lowest of each video first, each with a still: same name, .png).
"""

from __future__ import annotations

import _thread
import argparse
import json
import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
from tqdm import tqdm

from pipelines import preflight
from pipelines.config_command import add_config_arguments, config_from_args
from pipelines.console import console_stream, open_console, say
from pipelines.eval_stages import (
    ExpressionScorer,
    FrameReader,
    MaskPredictor,
    PolicyAnswerer,
    PolicyViewReader,
    video_items,
)
from veason_ray.config import VeasonConfig
from veason_ray.datasets import ViCaSDataset, open_dataset, select_expressions
from veason_ray.eval_overlays import draw_overlay, overlay_name, pick_worst
from veason_ray.eval_summary import format_summary, summarise_results, summary_markdown
from veason_ray.evaluation import ExpressionResult
from veason_ray.inference import check_answer_budget
from veason_ray.object_store import join_uri, store_for
from veason_ray.output_mirror import OutputMirror
from veason_ray.vicas_scoring import vicas_summary, vicas_summary_lines

log = logging.getLogger(__name__)
RESULTS = "results.jsonl"


@dataclass
class EvaluationReport:
    """A finished run: every selected expression's result and the summary document."""

    results: list[ExpressionResult]
    summary: dict[str, Any]
    output_dir: Path  # the local folder holding results.jsonl and the summaries
    outputs: OutputMirror  # where everything ends up (output_dir itself unless s3://)


def eval_outputs(cfg: VeasonConfig, output_dir: str | Path | None = None) -> OutputMirror:
    """Where the evaluation writes (`output_dir`, else eval.output_dir, else <run.output_dir>/eval): a folder, or
    an s3:// URI. For s3://, results.jsonl and the summaries are written into a local staging folder pushed there
    every eval.push_every_s and at the end (the results already there pulled first, so a rerun resumes); masks
    and overlay videos go there straight from the scorers."""
    folder = str(output_dir or cfg.eval.output_dir or join_uri(cfg.run.output_dir, "eval"))
    outputs = OutputMirror(folder, cfg.storage)
    outputs.pull(RESULTS)
    return outputs


def load_results(path: Path) -> dict[str, ExpressionResult]:
    """The results already in `path` by key (the last line of a key wins); a torn last line (a run killed while
    writing) is ignored."""
    done: dict[str, ExpressionResult] = {}
    if not path.exists():
        return done
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            result = ExpressionResult.from_json(json.loads(line))
        except (json.JSONDecodeError, TypeError):
            log.warning("%s:%d: unreadable line skipped (a run stopped while writing it)", path, number)
            continue
        done[result.key] = result
    return done


def build_pipeline(cfg: VeasonConfig, split: str, items: list[dict[str, str]], output_uri: str) -> Any:
    """The lazy Ray Dataset of result rows ({key, result JSON}) for `items` (one per video)."""
    data, pool = cfg.data, ray.data.ActorPoolStrategy
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    reader = dict(batch_size=1, batch_format="pyarrow", num_cpus=data.decode_num_cpus)
    ds = ds.map_batches(
        PolicyViewReader,
        fn_constructor_kwargs={"cfg": cfg, "split": split},
        compute=pool(size=max(1, data.decode_concurrency)),
        **reader,
    )
    if cfg.eval.answers == "policy":
        videos = max(1, cfg.eval.policy_batch_videos)  # concurrent calls per engine, joined into one
        ds = ds.map_batches(
            PolicyAnswerer,
            fn_constructor_kwargs={"cfg": cfg},
            batch_size=1,
            batch_format="pyarrow",
            compute=pool(
                size=max(1, cfg.rollout.engines),
                max_tasks_in_flight_per_actor=videos,
                max_concurrent_calls_per_actor=videos,
                enable_true_multi_threading=True,
            ),
            num_gpus=cfg.rollout.gpus_per_engine * cfg.rollout.tensor_parallel_size,  # its ranks' GPUs
            num_cpus=cfg.rollout.cpus_per_engine,
        )
    ds = ds.map_batches(
        FrameReader,
        fn_constructor_kwargs={"cfg": cfg, "split": split},
        compute=pool(size=max(1, data.decode_concurrency)),
        **reader,
    )
    ds = ds.map_batches(
        MaskPredictor,
        fn_constructor_kwargs={"cfg": cfg},
        batch_size=1,
        batch_format="pyarrow",
        compute=pool(size=max(1, cfg.reward.actors)),
        num_gpus=cfg.reward.gpus_per_actor,
        num_cpus=cfg.reward.cpus_per_actor,
    )
    return ds.map_batches(
        ExpressionScorer,
        fn_constructor_kwargs={"cfg": cfg, "split": split, "output_uri": output_uri},
        batch_size=1,
        batch_format="pyarrow",
        compute=pool(size=max(1, cfg.eval.scorers)),
        num_gpus=cfg.eval.scorer_gpus,
        num_cpus=1,
    )


class StallWatch:
    """Interrupts the driver's wait when no expression finished for `timeout_s` (every wait has a deadline)."""

    def __init__(self, timeout_s: float):
        self.timeout_s, self.last = timeout_s, time.monotonic()
        # `interrupt_main` does nothing while SIGINT has no Python handler (code such as vLLM's engine-core
        # entry point leaves SIG_DFL behind); a driver's main thread gets Python's own back
        main = threading.current_thread() is threading.main_thread()
        if main and not callable(signal.getsignal(signal.SIGINT)):
            signal.signal(signal.SIGINT, signal.default_int_handler)
        self.fired, self._stop = False, threading.Event()
        threading.Thread(target=self._watch, daemon=True, name="eval-stall-watch").start()

    def tick(self) -> None:
        self.last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, self.timeout_s)):
            if time.monotonic() - self.last > self.timeout_s:
                self.fired = True
                _thread.interrupt_main()
                return


def run_evaluation(
    cfg: VeasonConfig, output_dir: str | Path | None = None, split: str | None = None
) -> EvaluationReport:
    """Evaluate `cfg.model.policy` (or the ground-truth answers) on `split` (default `eval.split`, then
    `data.eval_split`) on the connected Ray cluster, into `output_dir` (see `eval_outputs`)."""
    split = split or cfg.eval.split or cfg.data.eval_split
    outputs = eval_outputs(cfg, output_dir)
    output_dir = outputs.local
    dataset = open_dataset(cfg.data.dataset, cfg.data.root, split, cfg.storage)
    records = select_expressions(
        list(dataset.expressions()), cfg.data.expression_types, cfg.eval.max_expressions, cfg.run.seed
    )
    if not records:
        raise SystemExit(
            f"no expressions of types {cfg.data.expression_types} in {cfg.data.root} split {split!r}: "
            "check data.root, eval.split and data.expression_types"
        )
    if cfg.eval.answers == "policy":
        longest_video = max(dataset.video(r.video).num_frames for r in records)
        try:
            check_answer_budget(cfg.inference, longest_video - 1)
        except ValueError as error:
            raise SystemExit(f"veason eval: {error}") from None
    results_path = output_dir / RESULTS
    done = load_results(results_path)
    if cfg.eval.retry_failed:
        done = {key: r for key, r in done.items() if r.error is None}
    todo = [r for r in records if r.key not in done]
    started, timing = time.perf_counter(), {"first_result_s": None, "first_results": 0}
    if todo:
        say(
            f"evaluating {len(todo)} expressions of {cfg.data.dataset} {split} ({len(records) - len(todo)} "
            f"already in {outputs.uri_of(RESULTS)})",
        )
        timing = _run_pipeline(cfg, split, todo, outputs, results_path)
    seconds = time.perf_counter() - started
    done = load_results(results_path)
    results = [done[r.key] for r in records if r.key in done]
    summary = summarise_results(
        results,
        benchmark=cfg.data.dataset,
        split=split,
        policy=cfg.model.policy if cfg.eval.answers == "policy" else "ground-truth answers",
        answers=cfg.eval.answers,
        seconds=seconds if todo else 0.0,
        evaluated=len(todo),
    )
    summary.update(timing)
    if isinstance(dataset, ViCaSDataset):  # its own LG-VIS score, and the entries its reader left out
        summary.update(vicas_summary(dataset, results))
    summary["worst_overlays"] = draw_worst(cfg, dataset, results, outputs)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    extra = "".join(f"{line}\n" for line in vicas_summary_lines(summary))
    (output_dir / "summary.md").write_text(summary_markdown(summary) + extra)
    outputs.push()
    return EvaluationReport(results, summary, output_dir, outputs)


def _run_pipeline(
    cfg: VeasonConfig, split: str, todo: list, outputs: OutputMirror, results_path: Path
) -> dict[str, Any]:
    """Run the job, appending each result to results.jsonl as it comes (pushed to the destination every
    eval.push_every_s, and when the run stops however it stops); when the first results came (seconds after the
    start: the actors' start-up and the first video through every stage) and how many."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False  # one bar: expressions, below
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its execution plan and per-operator lines
    pipeline = build_pipeline(cfg, split, video_items(todo), outputs.uri)
    watch = StallWatch(cfg.eval.stall_timeout_s)
    failed, started, first = 0, time.perf_counter(), {"first_result_s": None, "first_results": 0}
    pushed = time.monotonic()
    try:
        with (
            open(results_path, "a") as out,
            tqdm(total=len(todo), desc=f"eval {split}", unit="expr", file=console_stream()) as bar,
        ):
            for batch in pipeline.iter_batches(batch_size=None, batch_format="pyarrow"):
                for line in batch.column("result").to_pylist():
                    out.write(line + "\n")
                    failed += json.loads(line)["error"] is not None
                out.flush()
                watch.tick()
                if first["first_result_s"] is None:
                    first = {"first_result_s": time.perf_counter() - started, "first_results": batch.num_rows}
                bar.update(batch.num_rows)
                bar.set_postfix(failed=failed)
                if time.monotonic() - pushed >= cfg.eval.push_every_s:
                    outputs.push()
                    pushed = time.monotonic()
    except KeyboardInterrupt:
        if watch.fired:
            raise SystemExit(
                f"evaluation stalled: no expression finished in {cfg.eval.stall_timeout_s:.0f} s "
                "(eval.stall_timeout_s); what finished is in results.jsonl and a rerun resumes there"
            ) from None
        raise
    finally:
        watch.stop()
        outputs.push()
    return first


def draw_worst(
    cfg: VeasonConfig, dataset, results: list[ExpressionResult], outputs: OutputMirror
) -> list[str]:
    """Overlay videos and their stills (`draw_overlay`) of `eval.worst_overlays` low-J&F expressions with a
    target, one video each before any video gets two (`pick_worst`), from the mask PNGs the scorers wrote to
    the destination, into the local folder; the drawn keys."""
    from veason_ray.mask_io import read_mask_png

    if cfg.eval.worst_overlays <= 0 or not cfg.eval.write_masks:
        return []
    drawn = []
    for result in pick_worst(results, cfg.eval.worst_overlays):
        info = dataset.video(result.video)
        folder = outputs.uri_of(f"masks/{result.video}/{result.exp_id}")
        store = store_for(folder, cfg.storage)
        masks = np.stack(
            [read_mask_png(store.read_bytes(join_uri(folder, f"{n}.png"))) for n in info.frame_names]
        )
        record = dataset.expression(result.video, result.exp_id)
        path = outputs.local / "overlays" / ("worst_" + overlay_name(result.key))
        draw_overlay(
            path, dataset.read_frames(result.video), masks, dataset.gt_masks(record), result, cfg.infer.fps
        )
        drawn.append(result.key)
    return drawn


def format_report(report: EvaluationReport) -> str:
    """The subset table and reward lines of a finished run, for a console."""
    return "\n".join([format_summary(report.summary), *vicas_summary_lines(report.summary)])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from pipelines.ray_runtime import init_ray

    cfg = config_from_args(args, "eval")
    open_console(cfg, "eval")
    preflight.check("eval", preflight.evaluation_problems(cfg))
    init_ray(cfg.placement)
    report = run_evaluation(cfg)
    where = report.outputs.uri_of
    say(f"\n{format_report(report)}\n")
    say(f"results   {where(RESULTS)}")
    say(f"summary   {where('summary.md')} ({where('summary.json')})")
    if cfg.eval.write_masks:
        say(f"masks     {where('masks')}/<video>/<exp_id>/<frame>.png")
    if report.summary["worst_overlays"] or cfg.eval.overlays:
        say(f"overlays  {where('overlays')}/")
    return 0
