"""`veason compare`: the markdown values and signs, the chart, refusals and NaN, from summary.json files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.cli import main
from pipelines.eval_compare import comparison_rows


def _scores(j: float, f: float, r: float = math.nan, count: int = 60) -> dict:
    return {"j": j, "f": f, "jf": (j + f) / 2, "r_release": r, "r_corrected": r, "count": count}


def _summary(benchmark: str, subsets: dict, split: str = "valid", expressions: int = 120, **kw) -> dict:
    doc = {
        "benchmark": benchmark,
        "split": split,
        "policy": "/models/policy",
        "answers": "policy",
        "expressions": expressions,
        "failed": 0,
        "failures": {},
        "subsets": subsets,
        "extra_subsets": {},
        "rewards": {"format": 1.9, "keyframe": 0.5, "spatial": 0.3, "consistency": 0.4, "total": 3.1},
        "parse_rate": 0.98,
        "oracle": None,
        "seconds": 812.4,
        "expressions_per_s": 0.15,
    }
    return {**doc, **kw}


def _write(folder: Path, summary: dict) -> str:
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))  # json writes NaN as the JSON NaN literal
    return str(folder)


def _revos_pair(tmp_path: Path) -> tuple[str, str]:
    a = _summary(
        "revos",
        {
            "referring": _scores(0.60, 0.66, 0.90),
            "reasoning": _scores(0.40, 0.44, 0.80),
            "overall": _scores(0.50, 0.55, 0.85),
        },
        extra_subsets={"no-target (type 2)": _scores(math.nan, math.nan, count=0)},
    )
    b = _summary(
        "revos",
        {
            "referring": _scores(0.65, 0.70, 0.95),
            "reasoning": _scores(0.38, 0.42, 0.80),
            "overall": _scores(0.515, 0.56, 0.875),
        },
        extra_subsets={"no-target (type 2)": _scores(0.2, 0.3, count=4)},
        rewards={"format": 1.95, "keyframe": 0.45, "spatial": 0.35, "consistency": 0.4, "total": 3.15},
        parse_rate=0.99,
    )
    return _write(tmp_path / "sft", a), _write(tmp_path / "grpo", b)


def _markdown_rows(markdown: str) -> dict[tuple[str, str], list[str]]:
    """(first cell, second cell) -> remaining cells, for every body row of the subset table."""
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("|") and len(cells) == 5 and cells[0] not in ("subset", "---"):
            rows[(cells[0], cells[1])] = cells[2:]
    return rows


def _reward_rows(markdown: str) -> dict[str, list[str]]:
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("|") and len(cells) == 4 and cells[0] not in ("reward", "---"):
            rows[cells[0]] = cells[1:]
    return rows


def test_revos_comparison_table_and_chart(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    a, b = _revos_pair(tmp_path)
    out = tmp_path / "out"
    assert main(["compare", a, b, "--out", str(out)]) == 0
    markdown = (out / "compare.md").read_text()
    assert capsys.readouterr().out == markdown
    rows = _markdown_rows(markdown)
    assert rows[("referring", "J")] == ["60.0", "65.0", "+5.0"]
    assert rows[("referring", "J&F")] == ["63.0", "67.5", "+4.5"]
    assert rows[("reasoning", "F")] == ["44.0", "42.0", "-2.0"]
    assert rows[("overall", "R")] == ["85.0", "87.5", "+2.5"]
    assert rows[("overall", "R (release)")] == ["85.0", "87.5", "+2.5"]
    assert rows[("reasoning", "R")] == ["80.0", "80.0", "+0.0"]
    assert rows[("no-target (type 2)", "J&F")] == ["-", "25.0", "-"]
    assert rows[("no-target (type 2)", "R")] == ["-", "-", "-"]
    assert "| subset | metric (%) | sft | grpo | B − A |" in markdown
    rewards = _reward_rows(markdown)
    assert rewards["format"] == ["1.900", "1.950", "+0.050"]
    assert rewards["keyframe"] == ["0.500", "0.450", "-0.050"]
    assert rewards["parse rate (%)"] == ["98.0", "99.0", "+1.0"]

    png = out / "compare.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 10  # bars, text and axes, not a blank canvas


def test_mevis_single_subset_default_out_and_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    a = _write(tmp_path / "run_a", _summary("mevis", {"all": _scores(0.3, 0.4)}))
    b = _write(tmp_path / "run_b", _summary("mevis", {"all": _scores(0.35, 0.37)}, expressions=100))
    assert main(["compare", a, b, "--names", "before", "after"]) == 0
    out = Path(b) / "compare_vs_run_a"
    markdown = (out / "compare.md").read_text()
    rows = _markdown_rows(markdown)
    assert set(rows) == {("all", "J"), ("all", "F"), ("all", "J&F")}  # no R rows outside ReVOS
    assert rows[("all", "J&F")] == ["35.0", "36.0", "+1.0"]
    assert "| subset | metric (%) | before | after | B − A |" in markdown
    assert "120 expressions but" in capsys.readouterr().err
    assert "warning:" in markdown
    assert (out / "compare.png").stat().st_size > 0


def test_different_splits_are_refused_unless_forced(tmp_path: Path):
    a = _write(tmp_path / "a", _summary("revos", {"overall": _scores(0.5, 0.5)}, split="valid"))
    b = _write(tmp_path / "b", _summary("revos", {"overall": _scores(0.5, 0.5)}, split="test"))
    with pytest.raises(SystemExit) as refused:
        main(["compare", a, b, "--out", str(tmp_path / "out")])
    message = str(refused.value)
    assert "split 'valid'" in message and "split 'test'" in message and "--force" in message
    assert str(tmp_path / "a") in message and str(tmp_path / "b") in message
    assert not (tmp_path / "out").exists()
    assert main(["compare", a, b, "--out", str(tmp_path / "out"), "--force"]) == 0
    assert (tmp_path / "out" / "compare.md").is_file()


def test_different_benchmarks_are_refused(tmp_path: Path):
    a = _write(tmp_path / "a", _summary("revos", {"overall": _scores(0.5, 0.5)}))
    b = _write(tmp_path / "b", _summary("mevis", {"all": _scores(0.5, 0.5)}))
    with pytest.raises(SystemExit, match="benchmark 'revos' but .* benchmark 'mevis'"):
        main(["compare", a, b])


def test_missing_summary_is_named(tmp_path: Path):
    a = _write(tmp_path / "a", _summary("mevis", {"all": _scores(0.5, 0.5)}))
    with pytest.raises(SystemExit, match="summary.json: no such file"):
        main(["compare", a, str(tmp_path / "nowhere")])


def test_rows_without_files_handle_nan_and_missing_values():
    a = _summary("reasonvos", {"all": _scores(math.nan, math.nan)}, parse_rate=None, rewards={})
    b = _summary("reasonvos", {"all": _scores(0.2, 0.4)})
    rows = {(r.section, r.metric): r for r in comparison_rows(a, b)}
    assert math.isnan(rows[("all", "J")].a) and rows[("all", "J")].b == pytest.approx(0.2)
    assert math.isnan(rows[("all", "J")].delta)
    assert math.isnan(rows[("rewards", "total")].a) and rows[("rewards", "total")].b == pytest.approx(3.1)
    assert math.isnan(rows[("rewards", "parse rate")].a)
    assert ("all", "R") not in rows
