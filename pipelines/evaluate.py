"""Evaluation driver: a policy checkpoint and SAM2 on a dataset split, spread over a pool of EvaluatorActors.

Writes `results.jsonl` (one line per expression: answer, reward parts, J, F, R), `summary.json` (the subset
table of method.md section 7 and mean reward parts) and overlay PNGs of a few expressions.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import ray
from tqdm import tqdm

from actors.evaluator import EvaluatorActor
from veason_ray.config import VeasonConfig
from veason_ray.datasets import ExpressionRecord, open_dataset
from veason_ray.evaluation import ExpressionResult
from veason_ray.metrics import ExpressionScore, SubsetScore, revos_summary, subset_mean

REWARD_PARTS = ("format", "keyframe", "spatial", "consistency", "total")


@dataclass
class EvaluationReport:
    results: list[ExpressionResult]
    subsets: dict[str, SubsetScore]
    rewards: dict[str, float]
    parse_rate: float
    output_dir: Path
    oracle: dict[str, float] | None = None

    def summary(self) -> dict:
        return {
            "expressions": len(self.results),
            "subsets": {name: asdict(score) for name, score in self.subsets.items()},
            "rewards": self.rewards,
            "parse_rate": self.parse_rate,
            "oracle": self.oracle,
        }


def select_expressions(records: list[ExpressionRecord], types: list[int], limit: int, seed: int) -> list:
    """Expressions of the wanted types (records without a type are kept); with a limit, a seeded sample spread
    over the split, in dataset order."""
    chosen = [r for r in records if r.type_id is None or r.type_id in types]
    if 0 < limit < len(chosen):
        picked = np.random.default_rng(seed).choice(len(chosen), size=limit, replace=False)
        chosen = [chosen[i] for i in sorted(picked)]
    return chosen


def summarise(
    results: list[ExpressionResult], typed: bool
) -> tuple[dict[str, SubsetScore], dict[str, float]]:
    """The subset table (ReVOS: referring / reasoning / overall; otherwise all) and mean reward parts."""
    scores = [ExpressionScore(r.j, r.f, r.type_id, r.r_release, r.r_corrected) for r in results]
    subsets = revos_summary(scores) if typed else {"all": subset_mean(scores)}
    no_target = [s for s in scores if s.type_id == 2]
    if no_target:
        subsets["no-target (type 2)"] = subset_mean(no_target)
    rewards = {
        part: float(np.mean([r.rewards[part] for r in results])) if results else math.nan
        for part in REWARD_PARTS
    }
    return subsets, rewards


def summarise_oracle(results: list[ExpressionResult]) -> dict[str, float] | None:
    """Mean reward parts and J&F of the ground-truth answers (type 2 left out of J&F, as in the table)."""
    oracles = [(r, r.extra["oracle"]) for r in results if "oracle" in r.extra]
    if not oracles:
        return None
    summary = {part: float(np.mean([o["rewards"][part] for _, o in oracles])) for part in REWARD_PARTS}
    targets = [o["jf"] for r, o in oracles if r.type_id != 2]
    summary["jf"] = float(np.mean(targets)) if targets else math.nan
    return summary


def run_evaluation(cfg: VeasonConfig, output_dir: Path, split: str | None = None) -> EvaluationReport:
    """Evaluate `cfg.model.policy` on `split` (default `cfg.data.eval_split`) on the connected Ray cluster."""
    split = split or cfg.data.eval_split
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    dataset = open_dataset(cfg.data.dataset, cfg.data.root, split, cfg.storage)
    records = select_expressions(
        list(dataset.expressions()), cfg.data.expression_types, cfg.eval.max_expressions, cfg.run.seed
    )
    if not records:
        raise ValueError(
            f"no expressions of types {cfg.data.expression_types} in {cfg.data.root} split {split!r}"
        )
    # sam2 and transformers draw a progress bar per propagation / load: the driver's bar is the one to read.
    quiet = {"env_vars": {"TQDM_DISABLE": "1"}}
    actor_cls = ray.remote(num_cpus=1, num_gpus=cfg.eval.gpus_per_shard, runtime_env=quiet)(EvaluatorActor)
    pool = [actor_cls.remote(cfg, split) for _ in range(max(1, min(cfg.eval.shards, len(records))))]
    pending = {}
    for i, record in enumerate(records):
        overlay = str(output_dir / "overlays" / f"{i:04d}.png") if i < cfg.eval.write_overlays else None
        ref = pool[i % len(pool)].evaluate.remote(record.video, record.exp_id, cfg.run.seed + i, overlay)
        pending[ref] = i
    results: list[ExpressionResult | None] = [None] * len(records)
    with tqdm(total=len(records), desc=f"evaluate {split}", unit="expr") as progress:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            results[pending.pop(done[0])] = ray.get(done[0])
            progress.update(1)
    for actor in pool:
        ray.kill(actor)
    finished = [r for r in results if r is not None]
    subsets, rewards = summarise(finished, typed=any(r.type_id is not None for r in finished))
    parse_rate = float(np.mean([r.parse_failure is None for r in finished]))
    report = EvaluationReport(finished, subsets, rewards, parse_rate, output_dir, summarise_oracle(finished))
    with open(output_dir / "results.jsonl", "w") as handle:
        for result in finished:
            handle.write(json.dumps(result.as_json()) + "\n")
    (output_dir / "summary.json").write_text(json.dumps(report.summary(), indent=2))
    return report


def format_report(report: EvaluationReport) -> str:
    """The subset table and the reward parts as aligned text."""
    lines = [f"{'subset':<20} {'n':>4} {'J':>7} {'F':>7} {'J&F':>7} {'R':>7} {'R(rel)':>7}"]
    for name, s in report.subsets.items():
        lines.append(
            f"{name:<20} {s.count:>4} {100 * s.j:7.1f} {100 * s.f:7.1f} {100 * s.jf:7.1f} "
            f"{100 * s.r_corrected:7.1f} {100 * s.r_release:7.1f}"
        )
    parts = "  ".join(f"{part} {value:.3f}" for part, value in report.rewards.items())
    lines.append(f"policy reward: {parts}   parsable answers: {100 * report.parse_rate:.0f}%")
    if report.oracle:
        parts = "  ".join(f"{part} {report.oracle[part]:.3f}" for part in REWARD_PARTS)
        lines.append(f"oracle reward: {parts}   J&F {100 * report.oracle['jf']:.1f}  (ground-truth answers)")
    return "\n".join(lines)
