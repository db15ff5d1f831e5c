"""`veason compare RUN_A RUN_B [--out DIR] [--names A B] [--force]`: two evaluation runs side by side.

Reads `summary.json` of each evaluation output folder (the evaluation job writes it with
:func:`veason_ray.eval_summary.summarise_results`), refuses runs of different benchmarks or splits unless
--force, and writes to `--out` (default `<RUN_B>/compare_vs_<RUN_A's folder name>`): `compare.md`, a markdown
table per subset (J, F, J&F and, for ReVOS, R and R (release), in percent) and of the mean reward parts and
parse rate, with columns A, B and B − A; and `compare.png`, a grouped bar chart of J&F per subset. Prints the
markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from veason_ray.eval_summary import MISSING, metric_columns

REWARDS_SECTION = "rewards"  # the section of the reward rows (the others are subsets)


class ComparisonError(ValueError):
    """Two runs that should not be compared; the message names both."""


@dataclass(frozen=True)
class ComparisonRow:
    """One line of the comparison: ``metric`` of ``section`` (a subset, or "rewards") in run A and run B.

    ``a`` and ``b`` are NaN where a run lacks the value; ``percent`` says they are fractions shown in %."""

    section: str
    metric: str
    a: float
    b: float
    percent: bool

    @property
    def delta(self) -> float:
        """B − A in the row's own units (NaN when either is missing)."""
        return self.b - self.a


def _number(value: Any) -> float:
    """A summary value as float; None, missing and non-numbers become NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def _all_subsets(summary: dict) -> dict[str, dict]:
    return {**summary.get("subsets", {}), **summary.get("extra_subsets", {})}


def _subset_names(a: dict, b: dict) -> list[str]:
    """The subsets of A in their order, then those only B has."""
    names = list(_all_subsets(a))
    return names + [n for n in _all_subsets(b) if n not in names]


def check_comparable(a: dict, b: dict, name_a: str, name_b: str, force: bool = False) -> list[str]:
    """Warnings about comparing summaries ``a`` and ``b``; ComparisonError (naming both runs) for runs of
    different benchmarks or splits unless ``force``, where that becomes a warning too."""
    warnings = []
    for key in ("benchmark", "split"):
        if a.get(key) != b.get(key):
            message = f"{name_a} has {key} {a.get(key)!r} but {name_b} has {key} {b.get(key)!r}"
            if not force:
                raise ComparisonError(f"{message}; pass --force to compare them anyway")
            warnings.append(message)
    if a.get("expressions") != b.get("expressions"):
        warnings.append(
            f"{name_a} scored {a.get('expressions')} expressions but {name_b} scored {b.get('expressions')}"
        )
    return warnings


def comparison_rows(a: dict, b: dict) -> list[ComparisonRow]:
    """The rows of the comparison of two evaluation summaries (the `summary.json` documents): per subset J, F,
    J&F (and R, R (release) for ReVOS), then the mean reward parts (those of A in A's order, then any only B
    has) and the parse rate."""
    metrics = metric_columns("revos" if "revos" in (a.get("benchmark"), b.get("benchmark")) else "")
    subsets_a, subsets_b = _all_subsets(a), _all_subsets(b)
    rows = [
        ComparisonRow(
            subset,
            label,
            _number(subsets_a.get(subset, {}).get(key)),
            _number(subsets_b.get(subset, {}).get(key)),
            percent=True,
        )
        for subset in _subset_names(a, b)
        for label, key in metrics
    ]
    rewards_a, rewards_b = a.get("rewards") or {}, b.get("rewards") or {}
    rows += [
        ComparisonRow(
            REWARDS_SECTION, part, _number(rewards_a.get(part)), _number(rewards_b.get(part)), False
        )
        for part in [*rewards_a, *(p for p in rewards_b if p not in rewards_a)]
    ]
    rows.append(
        ComparisonRow(
            REWARDS_SECTION, "parse rate", _number(a.get("parse_rate")), _number(b.get("parse_rate")), True
        )
    )
    return rows


def _cell(value: float, percent: bool, signed: bool = False) -> str:
    if math.isnan(value):
        return MISSING
    shown = round(100 * value, 1) if percent else round(value, 3)
    shown += 0.0  # -0.0 + 0.0 is +0.0: a difference that rounds to zero shows as +0.0
    digits = 1 if percent else 3
    return f"{shown:+.{digits}f}" if signed else f"{shown:.{digits}f}"


def _value_cells(row: ComparisonRow) -> tuple[str, str, str]:
    """The A, B and signed B − A cells of ``row``."""
    return _cell(row.a, row.percent), _cell(row.b, row.percent), _cell(row.delta, row.percent, signed=True)


def _table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(line) + " |" for line in lines]


def markdown_report(
    a: dict, b: dict, rows: Sequence[ComparisonRow], names: Sequence[str], warnings: Sequence[str]
) -> str:
    """The comparison as markdown: a heading, the two runs, any warnings, the subset table (percent, one
    decimal) and the reward table (reward means to three decimals, parse rate in percent)."""
    name_a, name_b = names
    lines = [f"# {a.get('benchmark')} {a.get('split')}: {name_a} vs {name_b}", ""]
    for name, summary in ((name_a, a), (name_b, b)):
        lines.append(
            f"- **{name}**: policy `{summary.get('policy')}`, answers {summary.get('answers')}, "
            f"{summary.get('expressions')} expressions ({summary.get('failed', 0)} failed)"
        )
    lines += [f"- warning: {w}" for w in warnings] + [""]
    columns = (name_a, name_b, "B − A")
    lines += _table(
        ("subset", "metric (%)", *columns),
        [(r.section, r.metric, *_value_cells(r)) for r in rows if r.section != REWARDS_SECTION],
    )
    lines.append("")
    lines += _table(
        ("reward", *columns),
        [
            (f"{r.metric} (%)" if r.percent else r.metric, *_value_cells(r))
            for r in rows
            if r.section == REWARDS_SECTION
        ],
    )
    return "\n".join(lines) + "\n"


def write_chart(rows: Sequence[ComparisonRow], names: Sequence[str], title: str, path: Path) -> Path:
    """A grouped bar chart of J&F (%) per subset for runs A and B, each bar labelled with its value ("-"
    for a missing one, drawn at zero), saved as PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    jf = [r for r in rows if r.metric == "J&F"]
    x = np.arange(len(jf))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(jf) + 1.5), 3.8))
    for offset, name, values in ((-0.2, names[0], [r.a for r in jf]), (0.2, names[1], [r.b for r in jf])):
        heights = [0.0 if math.isnan(v) else 100 * v for v in values]
        bars = ax.bar(x + offset, heights, width=0.4, label=name)
        ax.bar_label(bars, labels=[_cell(v, True) for v in values], fontsize=8, padding=2)
    ax.set_xticks(x, [r.section for r in jf], fontsize=8)
    ax.set_ylabel("J&F (%)")
    ax.set_ylim(0, 110)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _read_summary(run: Path) -> dict:
    path = run / "summary.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(
            f"veason compare: {path}: no such file (is {run} an evaluation output folder?)"
        ) from None
    except json.JSONDecodeError as exc:
        raise SystemExit(f"veason compare: {path}: not valid JSON ({exc})") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_a", metavar="RUN_A", type=Path, help="evaluation output folder of run A (holds summary.json)"
    )
    parser.add_argument("run_b", metavar="RUN_B", type=Path, help="evaluation output folder of run B")
    parser.add_argument(
        "--out", type=Path, help="where compare.md and compare.png go (default: RUN_B/compare_vs_<RUN_A>)"
    )
    parser.add_argument(
        "--names", nargs=2, metavar=("A", "B"), help="column names (default: the folder names)"
    )
    parser.add_argument("--force", action="store_true", help="compare runs of different benchmarks or splits")


def run(args: argparse.Namespace) -> int:
    a, b = _read_summary(args.run_a), _read_summary(args.run_b)
    names = list(args.names or (args.run_a.resolve().name, args.run_b.resolve().name))
    try:
        warnings = check_comparable(
            a, b, f"{names[0]} ({args.run_a})", f"{names[1]} ({args.run_b})", args.force
        )
    except ComparisonError as exc:
        raise SystemExit(f"veason compare: {exc}") from None
    for warning in warnings:
        print(f"veason compare: warning: {warning}", file=sys.stderr)
    out = args.out or args.run_b / f"compare_vs_{args.run_a.resolve().name}"
    out.mkdir(parents=True, exist_ok=True)
    rows = comparison_rows(a, b)
    markdown = markdown_report(a, b, rows, names, warnings)
    (out / "compare.md").write_text(markdown)
    write_chart(rows, names, f"J&F per subset: {a.get('benchmark')} {a.get('split')}", out / "compare.png")
    print(markdown, end="")
    return 0
