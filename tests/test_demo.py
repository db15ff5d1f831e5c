"""The README's first command, end to end: `veason demo` on a local Ray cluster with the embedded default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TQDM_DISABLE": "1"}
    command = [
        sys.executable, "-m", "pipelines.cli", "demo", "configs/demo.yaml",
        f"run.output_dir={out}", f"data.root={out}/data/revos",
        f"model.policy={out}/models/qwen2_5_vl_tiny", f"reward.sam2.checkpoint={out}/models/sam2_tiny",
        "data.synth.videos=6", "data.synth.frames=8", "eval.max_expressions=4", "eval.worst_overlays=1",
        "trainer.steps=2", "trainer.save_every=1", "trainer.sample_images_every=1",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # the printed table and paths
    assert "oracle reward:" in done.stdout and "results" in done.stdout
    results = [json.loads(line) for line in (out / "eval" / "results.jsonl").read_text().splitlines()]
    assert len(results) == 4
    for result in results:
        assert result["error"] is None and result["response"]  # answered by the vLLM engine of the job
        assert 0.0 <= result["rewards"]["total"] <= 5.0
        assert 0.0 <= result["j"] <= 1.0 and 0.0 <= result["f"] <= 1.0
        oracle = result["extra"]["oracle"]["rewards"]
        # the ground-truth answer always matches the format and parses
        assert oracle["format"] >= 1.0
        if result["type_id"] != 2:
            assert oracle["format"] == 2.0 and oracle["keyframe"] == 1.0 and oracle["spatial"] > 0.99
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["expressions"] == 4 and "overall" in summary["subsets"]
    worst = sorted((out / "eval" / "overlays").glob("worst_*.mp4"))
    assert len(worst) == 1 and worst[0].stat().st_size > 0
    assert (out / "eval" / "summary.md").is_file() and (out / "eval_before" / "summary.json").is_file()
    assert (out / "config.yaml").is_file()
    # the data and models were written where the config said, in the real formats
    assert (out / "data" / "revos" / "meta_expressions_valid_.json").is_file()
    assert (out / "models" / "qwen2_5_vl_tiny" / "config.json").is_file()
    # the GRPO run between the two evaluations (colocated placement, real pools)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert 0.0 <= m["reward/total"] <= 5.0 and m["learner/sequences"] == 8  # 2 prompts x n=4
        assert m["weights/version"] == m["step"] and m["time/step_s"] > 0
    assert (out / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
    assert (out / "policy_hf" / "config.json").is_file() and (out / "curves.png").is_file()
    assert sorted((out / "samples").glob("step_000001_*.png"))
    assert "after GRPO" in done.stdout and "before GRPO" in done.stdout
