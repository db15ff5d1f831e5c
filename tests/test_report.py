"""pipelines/report.py: report.html from real run outputs (summaries written by `summarise_results`, a GRPO
run's metrics, curves and sample pictures, overlay stills, an SFT run's files, the resolved config), opened
from a file:// URL in headless chromium (the `browser` fixture of conftest.py): the before/after table shows
its rows and every image loads; missing inputs are notes on the page, and text is escaped."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from test_visualize import scored_group

from pipelines.report import write_report
from pipelines.run_log import RunLog, save_samples
from veason_ray.config_loading import load_config, save_config
from veason_ray.eval_overlays import draw_overlay
from veason_ray.eval_summary import summarise_results
from veason_ray.evaluation import ExpressionResult
from veason_ray.training.sft import FormatScore

PARTS = ("format", "keyframe", "spatial", "consistency", "total")


def _results(quality: float, oracle: bool) -> list[ExpressionResult]:
    """Three scored expressions of two videos, rewards and J/F growing with `quality`; one does not parse."""
    results = []
    for index, (video, exp_id) in enumerate((("v0", "0"), ("v0", "1"), ("v1", "0"))):
        rewards = dict(zip(PARTS, (2.0 * quality, quality, quality, quality, 5 * quality), strict=True))
        result = ExpressionResult(
            video, exp_id, f"the shape number {index}", index % 2, False, frame_indices=[0, 2, 4],
            parse_failure="no_answer_tag" if index == 0 else None, keyframe=None if index == 0 else 2,
            boxes=[] if index == 0 else [[10.0, 10.0, 40.0, 30.0]], rewards=rewards, j=quality, f=quality,
        )  # fmt: skip
        if oracle:
            result.extra["oracle"] = {"rewards": dict.fromkeys(PARTS, 1.0), "j": 1.0, "f": 1.0, "jf": 1.0}
        results.append(result)
    return results


def _evaluation(folder: Path, quality: float, oracle: bool) -> Path:
    """An evaluation folder: summary.json as `veason eval` writes it, one overlay video and its still."""
    results = _results(quality, oracle)
    summary = summarise_results(
        results, benchmark="revos", split="valid", policy="tiny", answers="policy", seconds=1.0, evaluated=3
    )
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    frames = np.full((6, 60, 80, 3), 90, dtype=np.uint8)
    gt = np.zeros((6, 60, 80), dtype=bool)
    gt[:, 10:30, 10:40] = True
    draw_overlay(folder / "overlays" / "worst_v1__0.mp4", frames, gt, gt, results[2], fps=6)
    return folder


def _grpo_run(folder: Path) -> Path:
    """A GRPO run's folder: metrics.jsonl and curves.png by RunLog, sample pictures of two steps."""
    cfg = load_config("configs/demo.yaml", ["trainer.wandb.mode=disabled"])
    run_log = RunLog(cfg, folder)
    for step in (1, 2, 3):
        parts = {
            "reward/format": 1.5 + 0.1 * step,
            "reward/keyframe": 0.2 * step,
            "reward/spatial": 0.1 * step,
        }
        run_log.log(step, {**parts, "reward/consistency": 0.1, "reward/total": sum(parts.values()) + 0.1})
    run_log.finish()
    for step in (1, 3):
        group, scored = scored_group([1.0, 2.0 + step])
        save_samples(step, [group], {group.group_id: scored}, folder, None)
    return folder


def _sft_run(folder: Path) -> Path:
    """An SFT run's folder: metrics.jsonl and sft_summary.json as `veason sft` writes them (no curve PNG)."""
    folder.mkdir(parents=True)
    rows = [{"step": s, "epoch": 0, "loss": 2.0 / s, "eval_loss": 2.5 / s if s % 2 == 0 else math.nan}
            for s in range(1, 5)]  # fmt: skip
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    before, after = FormatScore(8, 1, 0, 1.0), FormatScore(8, 7, 6, 14.0)
    summary = {"before": before.as_dict(), "after": after.as_dict(), "steps": len(rows)}
    (folder / "sft_summary.json").write_text(json.dumps(summary))
    return folder


def _images(browser) -> list[dict]:
    return browser.execute_script(
        "return Array.from(document.images, i => "
        "({src: i.src.slice(0, 22), loaded: i.complete && i.naturalWidth > 0, width: i.naturalWidth}))"
    )


def test_the_report_opens_in_a_browser_with_its_table_and_every_image(browser, tmp_path: Path):
    from selenium.webdriver.common.by import By

    evaluations = [
        ("random init", _evaluation(tmp_path / "eval_before", 0.2, oracle=False)),
        ("after SFT", tmp_path / "no_such_eval"),
        ("after GRPO", _evaluation(tmp_path / "eval", 0.6, oracle=True)),
    ]
    config = save_config(load_config("configs/demo.yaml"), tmp_path / "config.yaml")
    report = write_report(
        tmp_path / "site" / "report.html",
        title="veason demo",
        config_path=config,
        evaluations=evaluations,
        grpo_dir=_grpo_run(tmp_path / "grpo"),
        sft_dir=_sft_run(tmp_path / "sft"),
        next_steps=["veason eval configs/demo.yaml model.policy=<run>/policy_hf"],
    )
    browser.get(report.as_uri())
    assert browser.title == "veason demo"
    rows = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#evaluations tr")]
    assert len(rows) == 4  # the header, two evaluations, the ground-truth answers
    assert rows[1].startswith("random init revos valid 3 (0) 66.7%") and "20.0%" in rows[1]
    assert rows[2].startswith("after GRPO") and "60.0%" in rows[2] and "3.000" in rows[2]
    assert rows[3].startswith("ground-truth answers (scored in after GRPO)") and rows[3].endswith("100.0%")
    page = browser.find_element(By.TAG_NAME, "body").text
    assert "after SFT: no summary.json" in page
    assert "veason eval configs/demo.yaml" in page
    # the reward curves and the SFT loss as inline SVG; the SFT before/after table
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg polyline")) == 5 + 2
    sft = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#sft tr")]
    assert sft[1] == "parse_rate 12.5% 87.5%"
    # curves.png, 3 sample pictures (step 3 first: best, worst; then step 1), 2 overlay stills
    images = _images(browser)
    assert len(images) == 1 + 4 + 2, images
    assert all(i["loaded"] and i["src"].startswith("data:image/png;base64") for i in images), images
    captions = [f.text for f in browser.find_elements(By.TAG_NAME, "figcaption")]
    assert captions[1:5] == [
        "step_000003_group_3_best.png",
        "step_000003_group_3_worst.png",
        "step_000001_group_3_best.png",
        "step_000001_group_3_worst.png",
    ]
    assert captions[5:] == ["worst_v1__0.png"] * 2
    # the config, collapsed until opened
    details = browser.find_element(By.TAG_NAME, "details")
    assert not details.find_element(By.TAG_NAME, "pre").is_displayed()
    details.find_element(By.TAG_NAME, "summary").click()
    assert "worst_overlays" in details.find_element(By.TAG_NAME, "pre").text
    assert "<script" not in report.read_text() and "http://" not in report.read_text().replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )


def test_missing_inputs_are_notes_and_text_is_escaped(tmp_path: Path):
    report = write_report(
        tmp_path / "report.html",
        title="<b>run</b>",
        config_path=tmp_path / "missing.yaml",
        evaluations=[("<script>alert(1)</script>", tmp_path / "nothing")],
        grpo_dir=tmp_path / "no_grpo",
        sft_dir=tmp_path / "no_sft",
    )
    html = report.read_text()
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;: no summary.json" in html
    assert "<title>&lt;b&gt;run&lt;/b&gt;</title>" in html
    for note in ("no metrics.jsonl in", "no SFT outputs in", "no sample pictures in", "no config file at"):
        assert note in html
