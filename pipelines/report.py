"""report.html: what a run did, on one page a person opens in a browser. Self-contained (images inlined as
data: URIs, inline CSS, no script, nothing fetched from elsewhere); it only reads files other programs wrote:

    <eval dir>/summary.json      per evaluation (`veason eval`, veason_ray/eval_summary.py): parse_rate,
                                 rewards{format, keyframe, spatial, consistency, total}, subsets{overall
                                 (ReVOS) or all: j, f, jf}, oracle{reward parts, jf} or null, benchmark,
                                 split, expressions, failed
    <eval dir>/overlays/*.png    the overlay stills (veason_ray/eval_overlays.py)
    <grpo dir>/metrics.jsonl     `veason grpo` (pipelines/run_log.py): reward/* per step
    <grpo dir>/curves.png, samples/step_<N>_group_<G>_<best|worst|all_tied>.png
    <sft dir>/metrics.jsonl      `veason sft` (pipelines/sft.py): loss and eval_loss per step
    <sft dir>/loss_curve.png, sft_summary.json (before / after: parse rates and format scores)
    the config file              shown as text

A missing input is a short note on the page, never an error.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

from pipelines.run_log import CURVES, METRICS_FILE, SFT_CURVE_FILE, SFT_SUMMARY_FILE
from veason_ray.cot.records import read_jsonl
from veason_ray.eval_summary import headline_subset
from veason_ray.rewards import ordered_parts

SAMPLE_IMAGES = 6  # sample pictures shown, latest step first
OVERLAY_STILLS = 8  # overlay stills shown per evaluation
CHART_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.oracle td { font-style: italic; background: #f6f6f6; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption, .note { color: #666; font-size: 0.9em; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; }
svg text { font-family: system-ui, sans-serif; font-size: 11px; }
"""


def _read_json(path: Path) -> Any:
    """The JSON document at `path`, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _number(value: Any, percent: bool = False) -> str:
    """A table cell: percent with one decimal, or three decimals; "-" for a missing or NaN value."""
    if not isinstance(value, int | float) or math.isnan(value):
        return "-"
    return f"{100 * value:.1f}%" if percent else f"{value:.3f}"


def _note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def _image(path: Path, caption: str) -> str:
    """A <figure> with the PNG at `path` inlined as a data: URI."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{escape(caption)}">'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )


def _row(cells: Sequence[str], tag: str = "td", css_class: str = "") -> str:
    attribute = f' class="{css_class}"' if css_class else ""
    return f"<tr{attribute}>" + "".join(f"<{tag}>{escape(cell)}</{tag}>" for cell in cells) + "</tr>"


def evaluation_table(evaluations: Sequence[tuple[str, Path]]) -> str:
    """One row per evaluation (its summary.json), then the ground-truth answers' row (the last evaluation that
    scored them); notes for the evaluations without a summary."""
    rows, notes, oracle = [], [], None
    summaries = [(label, folder, _read_json(Path(folder) / "summary.json")) for label, folder in evaluations]
    parts = ordered_parts(p for *_, s in summaries if isinstance(s, dict) for p in s.get("rewards") or {})
    for label, folder, summary in summaries:
        if not isinstance(summary, dict):
            notes.append(f"{label}: no summary.json in {folder}")
            continue
        main, rewards = headline_subset(summary), summary.get("rewards") or {}
        cells = [
            label,
            f"{summary.get('benchmark', '?')} {summary.get('split', '')}",
            f"{summary.get('expressions', '-')} ({summary.get('failed', '-')})",
            _number(summary.get("parse_rate"), percent=True),
        ]
        cells += [_number(rewards.get(part)) for part in parts]
        rows.append(_row(cells + [_number(main.get(key), percent=True) for key in ("j", "f", "jf")]))
        oracle = (label, summary["oracle"]) if summary.get("oracle") else oracle
    if oracle is not None:
        label, scores = oracle
        cells = [f"ground-truth answers (scored in {label})", "", "", "-"]
        cells += [_number(scores.get(part)) for part in parts]
        rows.append(_row([*cells, "-", "-", _number(scores.get("jf"), percent=True)], css_class="oracle"))
    header = _row(["", "benchmark", "scored (failed)", "parse rate", *parts, "J", "F", "J&F"], "th")
    table = f'<table id="evaluations">{header}{"".join(rows)}</table>' if rows else ""
    return table + "".join(_note(n) for n in notes)


def svg_chart(title: str, series: dict[str, list[tuple[float, float]]], x_label: str = "step") -> str:
    """A line chart of `series` ({name: [(x, y), ...]}) as inline SVG, the y axis from 0 (or below); points
    that are not finite are left out."""
    series = {
        name: kept
        for name, points in series.items()
        if (kept := [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)])
    }
    if not series:
        return _note(f"{title}: nothing to draw")
    width, height, left, right, top, bottom = 720, 280, 50, 170, 24, 36
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points]
    x0, y0 = min(xs), min(0.0, min(ys))
    x1, y1 = max(max(xs), x0 + 1), max(max(ys), y0 + 1e-9)

    def at(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - x0) / (x1 - x0) * (width - left - right),
            height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom),
        )

    parts = [f'<text x="{left}" y="15" font-weight="bold">{escape(title)}</text>']
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        py = at(x0, y)[1]
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{py:.1f}" y2="{py:.1f}" stroke="#e4e4e4"/>')
        parts.append(f'<text x="{left - 6}" y="{py + 4:.1f}" text-anchor="end">{y:.3g}</text>')
    for x in sorted({round(x0 + (x1 - x0) * i / 5) for i in range(6)}):
        px = at(x, y0)[0]
        parts.append(f'<text x="{px:.1f}" y="{height - bottom + 14}" text-anchor="middle">{x:g}</text>')
    middle = (width - right + left) / 2
    parts.append(f'<text x="{middle}" y="{height - 4}" text-anchor="middle">{escape(x_label)}</text>')
    for index, (name, points) in enumerate(series.items()):
        colour = CHART_COLOURS[index % len(CHART_COLOURS)]
        pixels = [at(x, y) for x, y in points]
        line = " ".join(f"{px:.1f},{py:.1f}" for px, py in pixels)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{line}"/>')
        parts += [f'<circle cx="{px:.1f}" cy="{py:.1f}" r="2.5" fill="{colour}"/>' for px, py in pixels]
        y = top + 16 * index
        parts.append(f'<rect x="{width - right + 12}" y="{y}" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{width - right + 28}" y="{y + 9}">{escape(name)}</text>')
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="{escape(title)}">{"".join(parts)}</svg>'
    )


def _curve(rows: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(float(r["step"]), float(r[key])) for r in rows if isinstance(r.get(key), int | float)]


def grpo_section(grpo_dir: Path) -> str:
    """The reward parts per step (from metrics.jsonl) and curves.png."""
    rows = list(read_jsonl(Path(grpo_dir) / METRICS_FILE))
    keys = [key for key in CURVES if key.startswith("reward/")]
    html = svg_chart("GRPO reward per step", {key: _curve(rows, key) for key in keys}) if rows else ""
    html = html or _note(f"no {METRICS_FILE} in {grpo_dir}")
    curves = Path(grpo_dir) / "curves.png"
    return html + (_image(curves, "curves.png: reward parts and KL per step") if curves.is_file() else "")


def sft_section(sft_dir: Path) -> str:
    """The loss per step (metrics.jsonl), loss_curve.png and the before/after table of sft_summary.json."""
    folder = Path(sft_dir)
    rows = list(read_jsonl(folder / METRICS_FILE))
    html = ""
    if rows:
        losses = {"train loss": _curve(rows, "loss"), "held-out loss": _curve(rows, "eval_loss")}
        html += svg_chart("SFT loss per step (nats per answer token)", losses)
    if (folder / SFT_CURVE_FILE).is_file():
        html += _image(folder / SFT_CURVE_FILE, f"{SFT_CURVE_FILE}: loss and held-out parse rate")
    summary = _read_json(folder / SFT_SUMMARY_FILE)
    if isinstance(summary, dict):
        before, after = summary.get("before") or {}, summary.get("after") or {}
        body = "".join(
            _row([name, _number(before.get(name), pct), _number(after.get(name), pct)])
            for name, pct in (
                ("parse_rate", True),
                ("format_match_rate", True),
                ("format_reward_mean", False),
                ("teacher_keyframe_rate", True),
                ("teacher_box_iou_mean", False),
            )
        )
        header = _row(["held-out prompts", "before", "after"], "th")
        html += f'<table id="sft">{header}{body}</table>'
    return html or _note(f"no SFT outputs in {folder}")


def _step_of(path: Path) -> int:
    found = re.match(r"step_(\d+)_", path.name)
    return int(found.group(1)) if found else -1


def samples_section(grpo_dir: Path) -> str:
    """The latest sample pictures of the GRPO run, latest step first."""
    folder = Path(grpo_dir) / "samples"
    pictures = sorted(folder.glob("*.png"), key=lambda p: (-_step_of(p), p.name))
    if not pictures:
        return _note(f"no sample pictures in {folder}")
    return "".join(_image(p, p.name) for p in pictures[:SAMPLE_IMAGES])


def overlays_section(evaluations: Sequence[tuple[str, Path]]) -> str:
    """Each evaluation's overlay stills (worst ones first)."""
    html = ""
    for label, folder in evaluations:
        stills = sorted(
            (Path(folder) / "overlays").glob("*.png"), key=lambda p: (not p.name.startswith("worst_"), p.name)
        )
        html += f"<h3>{escape(label)}</h3>"
        html += "".join(_image(p, p.name) for p in stills[:OVERLAY_STILLS]) or _note("no overlay stills")
    return html


def config_section(config_path: str | Path | None) -> str:
    path = None if config_path is None else Path(config_path)
    if path is None or not path.is_file():
        return _note(f"no config file at {config_path}")
    return f"<details><summary>{escape(str(path))}</summary><pre>{escape(path.read_text())}</pre></details>"


def write_report(
    path: str | Path,
    *,
    title: str,
    config_path: str | Path | None,
    evaluations: list[tuple[str, Path]],
    grpo_dir: Path | None = None,
    sft_dir: Path | None = None,
    next_steps: Sequence[str] = (),
) -> Path:
    """Write report.html at `path` (parent folders created) from the outputs named (see the module's
    docstring): evaluations as (label, eval dir), e.g. ("before GRPO", run/eval_before); a run not given
    (grpo_dir, sft_dir None) has no section; `next_steps`, commands listed at the end. Returns the path."""
    steps = "".join(f"<li><code>{escape(step)}</code></li>" for step in next_steps)
    sections = [
        ("Before and after", evaluation_table(evaluations) or _note("no evaluations given")),
        ("GRPO reward", grpo_section(grpo_dir) if grpo_dir is not None else ""),
        ("CoT-SFT", sft_section(sft_dir) if sft_dir is not None else ""),
        ("Sample responses (GRPO)", samples_section(grpo_dir) if grpo_dir is not None else ""),
        ("Overlays", overlays_section(evaluations)),
        ("Configuration", config_section(config_path)),
        ("Next steps", f"<ol>{steps}</ol>" if steps else ""),
    ]
    body = "".join(f"<h2>{escape(name)}</h2>{html}" for name, html in sections if html)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>"
        f"<body><h1>{escape(title)}</h1>{body}</body></html>\n"
    )
    return path
