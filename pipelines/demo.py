"""`veason demo`: the embedded default, end to end, on a local Ray cluster: the method's two stages on the
synthetic world with a tiny policy, sized for minutes on a laptop.

    world     the synthetic world at data.root and the tiny random-init models, written when missing
    1 init    the random-init policy on the held-out split (`pipelines/evaluate.py`): it never parses
    2 cot     chain-of-thought records of the train split from the offline teacher (`pipelines/cot.py`)
    3 sft     CoT-SFT on them (`pipelines/sft.py`: Ray Train + DeepSpeed), then the held-out split again
    4 grpo    GRPO from the SFT policy (`pipelines/grpo.py`: rollout, reward and learner pools), then again
    report    the before/after table on the console and report.html (tables, curves, pictures, the config)

Masks come from `reward.propagator` (the demo's config: the synthetic world's colour tracker, so J&F means
something without SAM2 weights); the oracle row scores the ground-truth answers the same way. Each stage leaves
a marker with the fingerprint of the settings it depends on: a rerun with the same settings reuses the stage
(a second `make demo` takes seconds), a changed setting reruns that stage and the ones after it.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines import preflight
from pipelines.config_command import add_config_arguments, config_from_args
from pipelines.console import open_console, say
from veason_ray.config import VeasonConfig
from veason_ray.config_loading import config_to_dict, save_config
from veason_ray.eval_summary import headline_subset
from veason_ray.object_store import is_s3_uri, join_uri
from veason_ray.rewards import ordered_parts

STAGE_MARKER = (
    "demo_stage.json"  # in each stage's folder: the settings' fingerprint, written when it finished
)
SYNTH_MARKER = "veason_synth.json"  # in a world the demo wrote: the data.synth settings it was written with
# The config sections each stage depends on, cumulative: a stage reruns when any section of it or of a stage
# before it changed.
STAGE_SECTIONS = {
    "eval_init": ("run", "data", "model", "inference", "eval", "reward", "storage"),
    "cot": ("cot",),
    "sft": ("sft", "learner", "placement"),
    "eval_sft": (),
    "grpo": ("rollout", "trainer"),
    "eval": (),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, default="configs/demo.yaml")


def ensure_dataset(cfg: VeasonConfig) -> str:
    """Write the synthetic world at `data.root` when it is missing and `data.synth.enabled`; a world the demo
    wrote with other `data.synth` settings is written again (a folder without the demo's marker is never
    touched)."""
    from veason_ray.synth.writer import write_synthetic_dataset

    root, synth = cfg.data.root, cfg.data.synth
    settings = {"layout": cfg.data.dataset, **config_to_dict(cfg)["data"]["synth"]}
    marker = Path(root) / SYNTH_MARKER
    if is_s3_uri(root):
        return f"dataset: {root} (existing)"
    if Path(root).exists():
        if not marker.is_file() or json.loads(marker.read_text()) == settings:
            return f"dataset: {root} (existing)"
        shutil.rmtree(root)  # the demo's own world, written with other settings
    if not synth.enabled:
        raise SystemExit(
            f"data.root {root} does not exist; point data.root at a dataset or set data.synth.enabled=true"
        )
    summary = write_synthetic_dataset(
        root,
        layout="reasonvos" if cfg.data.dataset == "reasonvos" else "revos",
        num_videos=synth.videos,
        num_frames=synth.frames,
        height=synth.height,
        width=synth.width,
        seed=synth.seed,
        valid_fraction=synth.valid_fraction,
        min_objects=synth.min_objects,
        max_objects=synth.max_objects,
    )
    marker.write_text(json.dumps(settings) + "\n")
    return f"dataset: {root} (synthetic, written now: {summary.num_videos} videos)"


def ensure_tiny_models(cfg: VeasonConfig) -> list[str]:
    """Write the tiny policy / SAM2 where the config names a missing folder of the tiny models' names (the tiny
    policy again when it was written with another `model.tiny_image_pixels`)."""
    from veason_ray.models.tiny_qwen import TINY_QWEN_DIRNAME, tiny_qwen_marker, write_tiny_qwen
    from veason_ray.models.tiny_sam2 import SAM2_TINY_DIRNAME, write_tiny_sam2

    notes = []
    policy, pixels = Path(cfg.model.policy), cfg.model.tiny_image_pixels
    marker = tiny_qwen_marker(policy) if policy.name == TINY_QWEN_DIRNAME else None
    stale = marker is not None and marker.get("image_pixels", 0) != pixels
    if policy.name == TINY_QWEN_DIRNAME and (not policy.exists() or stale):
        write_tiny_qwen(policy, seed=cfg.run.seed, image_pixels=pixels)
        notes.append(f"policy: {policy} (tiny random-init Qwen2.5-VL, written now)")
    else:
        notes.append(f"policy: {cfg.model.policy}")
    checkpoint = Path(cfg.reward.sam2.checkpoint)
    sam2_dir = checkpoint.parent if checkpoint.suffix == ".pt" else checkpoint
    if sam2_dir.name == SAM2_TINY_DIRNAME and not checkpoint.exists():
        write_tiny_sam2(sam2_dir, seed=cfg.run.seed, image_size=cfg.reward.sam2.image_size or 256)
        notes.append(f"sam2: {cfg.reward.sam2.checkpoint} (tiny random-init SAM2, written now)")
    else:
        notes.append(f"sam2: {cfg.reward.sam2.checkpoint}")
    return notes


def stage_fingerprints(cfg: VeasonConfig) -> dict[str, str]:
    """Each stage's fingerprint: a hash of the config sections it and the stages before it depend on."""
    tree, sections, prints = config_to_dict(cfg), [], {}
    for stage, own in STAGE_SECTIONS.items():
        sections += own
        text = json.dumps({s: tree.get(s) for s in sections}, sort_keys=True, default=str)
        prints[stage] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return prints


class Stages:
    """The demo's stages under `out`: `run(name, title, work)` reuses a stage finished with the same fingerprint,
    else clears its folder, runs `work()` and marks it finished; the seconds of each are kept for the summary."""

    def __init__(self, out: Path, fingerprints: dict[str, str]) -> None:
        self.out, self.fingerprints = out, fingerprints
        self.seconds: dict[str, float] = {}
        self.reused: list[str] = []
        self._stale = False  # a stage ran: the ones after it run too

    def run(self, name: str, title: str, work: Callable[[], Any]) -> Any:
        folder = self.out / name
        marker = folder / STAGE_MARKER
        finished = json.loads(marker.read_text()) if marker.is_file() else {}
        number = list(self.fingerprints).index(name) + 1
        if finished.get("fingerprint") == self.fingerprints[name] and not self._stale:
            say(f"\n[{number}/{len(self.fingerprints)}] {title}: reused ({folder}, same settings)")
            self.reused.append(name)
            self.seconds[name] = 0.0
            return finished.get("result")
        say(f"\n[{number}/{len(self.fingerprints)}] {title}")
        self._stale = True
        if folder.exists():
            shutil.rmtree(folder)
        started = time.perf_counter()
        result = work()
        self.seconds[name] = time.perf_counter() - started
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"fingerprint": self.fingerprints[name], "result": result}, default=str))
        return result


def evaluation_row(label: str, summary: dict[str, Any]) -> dict[str, Any]:
    return {
        "label": label,
        "parse_rate": summary.get("parse_rate"),
        **summary["rewards"],
        "jf": headline_subset(summary).get("jf"),
    }


def learning_table(rows: list[dict[str, Any]], oracle: dict[str, Any] | None) -> str:
    """The held-out split before and after each stage, and what the ground-truth answers score."""
    parts = ordered_parts(key for row in rows for key in row if key not in ("label", "parse_rate", "jf"))
    labels = {"keyframe": "keyfr.", "spatial": "box", "consistency": "cons.", "total": "reward"}
    head = f"{'policy on the held-out split':30s} {'parsed':>7s}"
    head += "".join(f" {labels.get(part, part)[:7]:>7s}" for part in parts) + f" {'J&F':>6s}"
    lines = [head]

    def number(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for row in rows + ([{"label": "ground-truth answers", "parse_rate": 1.0, **oracle}] if oracle else []):
        lines.append(
            f"{row['label']:30s} {number(row['parse_rate'] and 100 * row['parse_rate'], '6.1f')}%"
            + "".join(f" {number(row.get(part), '7.3f')}" for part in parts)
            + f" {number(row.get('jf') and 100 * row['jf'], '6.1f')}"
        )
    return "\n".join(lines)


def held_out_example(cfg: VeasonConfig) -> tuple[str, str]:
    """A video folder and an expression of the held-out split, for the `veason infer` example."""
    from veason_ray.datasets import TYPE_NO_TARGET, open_dataset

    dataset = open_dataset(cfg.data.dataset, cfg.data.root, cfg.data.eval_split, cfg.storage)
    record = next(r for r in dataset.expressions() if r.type_id != TYPE_NO_TARGET)
    return join_uri(dataset.image_root, record.video), record.expression


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, "demo")
    open_console(cfg, "demo")
    from pipelines.cot import write_cot_records
    from pipelines.evaluate import run_evaluation
    from pipelines.grpo import train
    from pipelines.ray_runtime import init_ray
    from pipelines.report import write_report
    from pipelines.sft import fine_tune

    started = time.perf_counter()
    out = Path(cfg.run.output_dir)
    config_path = save_config(cfg, out / "config.yaml")
    for note in (ensure_dataset(cfg), *ensure_tiny_models(cfg)):
        say(note)
    preflight.check("demo", [*preflight.training_problems(cfg), *preflight.evaluation_problems(cfg)])
    init_ray(cfg.placement)
    stages = Stages(out, stage_fingerprints(cfg))

    def evaluate(policy_cfg: VeasonConfig, name: str) -> dict[str, Any]:
        return run_evaluation(policy_cfg, out / name).summary

    initial = stages.run(
        "eval_init", "the random-init policy on the held-out split", lambda: evaluate(cfg, "eval_init")
    )
    stage1 = copy.deepcopy(cfg)
    stage1.cot.output_dir, stage1.sft.output_dir = str(out / "cot"), str(out / "sft")
    stages.run(
        "cot", "chain-of-thought records from the offline teacher", lambda: vars(write_cot_records(stage1))
    )
    sft = stages.run("sft", "CoT-SFT of the policy on them", lambda: fine_tune(stage1))
    sft_cfg = copy.deepcopy(cfg)
    sft_cfg.model.policy = str(sft["export"])
    after_sft = stages.run(
        "eval_sft", "the SFT policy on the held-out split", lambda: evaluate(sft_cfg, "eval_sft")
    )
    grpo_cfg = copy.deepcopy(sft_cfg)
    grpo_cfg.run.output_dir = str(out / "grpo")
    grpo = stages.run("grpo", "GRPO from the SFT policy", lambda: train(grpo_cfg))
    trained = copy.deepcopy(cfg)
    trained.model.policy = str(grpo["policy"])
    after = stages.run("eval", "the GRPO policy on the held-out split", lambda: evaluate(trained, "eval"))

    rows = [
        evaluation_row("random init", initial),
        evaluation_row("after CoT-SFT", after_sft),
        evaluation_row("after GRPO", after),
    ]
    video, query = held_out_example(cfg)
    next_steps = [
        f'veason infer {config_path} model.policy={grpo["policy"]} input={video} query="{query}"',
        f"veason serve {config_path} model.policy={grpo['policy']}   # then open http://127.0.0.1:8000/",
        "veason eval configs/qwen2.5vl-3b-1gpu.yaml model.policy=YOUR_POLICY data.root=YOUR_REVOS   # on a GPU",
    ]
    report = write_report(
        out / "report.html",
        title="veason demo: CoT-SFT, then GRPO, on the synthetic world",
        config_path=config_path,
        evaluations=[
            ("random init", out / "eval_init"),
            ("after CoT-SFT", out / "eval_sft"),
            ("after GRPO", out / "eval"),
        ],
        grpo_dir=out / "grpo",
        sft_dir=out / "sft",
        next_steps=next_steps,
    )
    summary = {
        "rows": rows,
        "oracle": after.get("oracle"),
        "stage_seconds": stages.seconds,
        "reused": stages.reused,
        "seconds": time.perf_counter() - started,
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    say("\n" + learning_table(rows, after.get("oracle")))
    split = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in stages.seconds.items())
    say(f"\nfinished in {summary['seconds']:.0f} s ({split})")
    say(f"  report   {report}   <- open it in a browser")
    say(f"  policy   {grpo['policy']} (after SFT: {sft['export']})")
    say(f"  runs     {out}/: eval_init/ cot/ sft/ eval_sft/ grpo/ eval/, logs/ (the libraries' output)")
    say("next:")
    for command in next_steps:
        say(f"  {command}")
    return 0
