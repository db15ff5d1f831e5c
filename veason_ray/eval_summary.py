"""A benchmark run's summary (docs/method.md section 7): exactly the subsets each benchmark reports, from the
per-expression results of `veason eval` (results.jsonl), as summary.json, summary.md and a console table.

ReVOS: referring (type 0), reasoning (type 1), overall (their macro mean) with J, F, J&F and R (the corrected R
and the release-compatible one); no-target expressions (type 2) are outside J&F and shown apart. MeViS and
ReasonVOS: J, F and J&F over all expressions ("all"). Expressions that could not be evaluated (`error`) are
counted by reason and kept out of the means.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from veason_ray.evaluation import ExpressionResult
from veason_ray.metrics import ExpressionScore, SubsetScore, revos_summary, subset_mean
from veason_ray.rewards import ordered_parts

NO_TARGET = "no-target (type 2)"


def benchmark_subsets(benchmark: str, scored: Sequence[ExpressionResult]) -> tuple[dict, dict]:
    """(the benchmark's own subsets, extra subsets) as {name: SubsetScore}."""
    scores = [ExpressionScore(r.j, r.f, r.type_id, r.r_release, r.r_corrected) for r in scored]
    if benchmark != "revos":
        return {"all": subset_mean(scores)}, {}
    no_target = [s for s in scores if s.type_id == 2]
    return revos_summary(scores), ({NO_TARGET: subset_mean(no_target)} if no_target else {})


def headline_subset(summary: dict[str, Any]) -> dict[str, Any]:
    """The subset a benchmark's summary headlines (`benchmark_subsets`): ReVOS "overall", the others "all"."""
    subsets = summary.get("subsets") or {}
    return subsets.get("overall") or subsets.get("all") or {}


def failure_reason(error: str) -> str:
    """The kind of a failure: the text before the first ':' of its error."""
    return error.split(":", 1)[0].strip() or "error"


def summarise_results(
    results: Sequence[ExpressionResult],
    *,
    benchmark: str,
    split: str,
    policy: str,
    answers: str,
    seconds: float,
    evaluated: int,
) -> dict[str, Any]:
    """The summary.json document of a run (results in any order); `evaluated` of them were evaluated in this
    run's `seconds` (a resumed run reuses the others)."""
    scored = sorted((r for r in results if r.error is None), key=lambda r: r.key)
    failed = [r for r in results if r.error is not None]
    subsets, extra = benchmark_subsets(benchmark, scored)

    def mean(values: list[float]) -> float:
        return float(np.mean(values)) if values else math.nan

    def reward_means(rewards: list[dict[str, float]]) -> dict[str, float]:
        """Each reward part's mean over the answers that scored it (the scored terms follow reward.weights)."""
        parts = ordered_parts(part for r in rewards for part in r)
        return {part: mean([r[part] for r in rewards if part in r]) for part in parts}

    oracles = [(r, r.extra["oracle"]) for r in scored if "oracle" in r.extra]
    oracle = None
    if oracles:
        oracle = reward_means([o["rewards"] for _, o in oracles])
        oracle["jf"] = mean([o["jf"] for r, o in oracles if r.type_id != 2])
    return {
        "benchmark": benchmark,
        "split": split,
        "policy": policy,
        "answers": answers,
        "expressions": len(scored),
        "failed": len(failed),
        "failures": dict(sorted(Counter(failure_reason(r.error) for r in failed).items())),
        "subsets": {name: asdict(score) for name, score in subsets.items()},
        "extra_subsets": {name: asdict(score) for name, score in extra.items()},
        "rewards": reward_means([r.rewards for r in scored]),
        "parse_rate": mean([float(r.parse_failure is None) for r in scored]),
        "oracle": oracle,
        "seconds": round(seconds, 2),
        "expressions_per_s": evaluated / seconds if seconds > 0 else math.nan,
    }


MISSING = "-"  # a metric with nothing to average (a subset with no member), in every table


def _pct(value: float) -> str:
    return MISSING if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _percent(value: float) -> str:
    return MISSING if value is None or math.isnan(value) else f"{_pct(value)}%"


def _num(value: float, digits: int = 3) -> str:
    return MISSING if value is None or math.isnan(value) else f"{value:.{digits}f}"


def metric_columns(benchmark: str) -> list[tuple[str, str]]:
    """(label, SubsetScore field) of the metrics a benchmark reports: J, F, J&F, and for ReVOS R (corrected)
    and R (release)."""
    columns = [("J", "j"), ("F", "f"), ("J&F", "jf")]
    if benchmark == "revos":
        columns += [("R", "r_corrected"), ("R (release)", "r_release")]
    return columns


def subset_rows(summary: dict[str, Any]) -> list[tuple[str, int, list[str]]]:
    """(subset, count, formatted columns) for the benchmark's subsets, then the extra ones."""
    columns = metric_columns(summary["benchmark"])
    rows = []
    for name, score in [*summary["subsets"].items(), *summary["extra_subsets"].items()]:
        score = SubsetScore(**score)
        rows.append((name, score.count, [_pct(getattr(score, key)) for _, key in columns]))
    return rows


def summary_markdown(summary: dict[str, Any]) -> str:
    """summary.md: what was evaluated, the subset table (percent), rewards, parse rate, failures, speed."""
    columns = metric_columns(summary["benchmark"])
    lines = [
        f"# {summary['benchmark']} {summary['split']}: {summary['policy']}",
        "",
        f"{summary['expressions']} expressions scored, {summary['failed']} failed "
        f"(answers: {summary['answers']}; {summary['seconds']:.0f} s, "
        f"{_num(summary['expressions_per_s'], 2)} expressions/s).",
        "",
        "| subset | n | " + " | ".join(label for label, _ in columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    for name, count, values in subset_rows(summary):
        lines.append(f"| {name} | {count} | " + " | ".join(values) + " |")
    rewards = ", ".join(f"{part} {_num(value)}" for part, value in summary["rewards"].items())
    lines += ["", f"Reward means: {rewards}. Parsable answers: {_percent(summary['parse_rate'])}."]
    if summary["oracle"]:
        oracle = summary["oracle"]
        lines.append(
            f"Ground-truth answers through the same path: reward total {_num(oracle['total'])}, "
            f"J&F {_pct(oracle['jf'])}."
        )
    if summary["failures"]:
        failures = ", ".join(f"{reason} {count}" for reason, count in summary["failures"].items())
        lines.append(f"Not evaluated (kept out of the means; see results.jsonl): {failures}.")
    return "\n".join(lines) + "\n"


def format_summary(summary: dict[str, Any]) -> str:
    """The subset table and the reward line, aligned for a console."""
    columns = metric_columns(summary["benchmark"])
    header = f"{'subset':<20} {'n':>5} " + " ".join(f"{label:>11}" for label, _ in columns)
    lines = [header]
    for name, count, values in subset_rows(summary):
        lines.append(f"{name:<20} {count:>5} " + " ".join(f"{v:>11}" for v in values))
    parts = "  ".join(f"{part} {_num(value)}" for part, value in summary["rewards"].items())
    lines.append(f"policy reward: {parts}   parsable answers: {_percent(summary['parse_rate'])}")
    if summary["oracle"]:
        oracle = summary["oracle"]
        parts = "  ".join(f"{part} {_num(value)}" for part, value in oracle.items() if part != "jf")
        lines.append(f"oracle reward: {parts}   J&F {_pct(oracle['jf'])}  (ground-truth answers)")
    if summary["failed"]:
        lines.append(f"failed: {summary['failed']} ({summary['failures']})")
    return "\n".join(lines)
