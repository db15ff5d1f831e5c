"""Paths in a submitted job: a relative output (lost with Ray's copy of the working directory) and a relative
input the copy does not hold are refused, naming the key; s3://, absolute paths, files in the copy and hub ids
pass; a program run by hand keeps its relative paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pipelines.job_paths import in_working_dir_copy, relative_path_problems
from veason_ray.config_loading import load_config

REPO = Path(__file__).resolve().parents[1]


def test_a_job_is_recognised_by_its_working_dir_copy_or_its_runtime_env(tmp_path):
    copy = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    assert in_working_dir_copy(copy, {})
    job_env = {
        "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg.zip"}})
    }
    assert in_working_dir_copy(tmp_path, job_env)
    assert not in_working_dir_copy(tmp_path, {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {}})})
    assert not in_working_dir_copy(tmp_path, {})


def test_relative_outputs_and_missing_relative_inputs_are_named(tmp_path):
    cfg = load_config(
        "configs/demo.yaml",
        [
            "eval.output_dir=/shared/eval",
            "model.policy=Qwen/Qwen2.5-VL-3B-Instruct",
            "reward.sam2.checkpoint=sam2",
        ],
    )
    (tmp_path / "sam2").mkdir()  # in the copy: read as usual
    problems = relative_path_problems(cfg, cwd=tmp_path)
    keys = [p.split("=", 1)[0] for p in problems]
    assert keys == ["run.output_dir", "data.root"]  # demo: runs/demo and runs/demo/data/revos
    assert "lost when the job ends" in problems[0] and "s3://" in problems[0]
    assert "does not hold" in problems[1]
    fine = load_config(
        "configs/demo.yaml",
        ["run.output_dir=s3://bucket/runs/demo", f"data.root={tmp_path}", "model.policy=s3://bucket/policy",
         "reward.sam2.checkpoint=s3://bucket/sam2"],
    )  # fmt: skip
    assert relative_path_problems(fine, cwd=tmp_path) == []


def test_a_submitted_program_refuses_before_it_starts(tmp_path):
    env = {**os.environ, "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"working_dir": "x"}})}
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "config", "configs/demo.yaml"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "veason config: paths that cannot work in a job" in done.stderr
    assert "run.output_dir=runs/demo is a relative path" in done.stderr
    by_hand = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "config", "configs/demo.yaml"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if k != "RAY_JOB_CONFIG_JSON_ENV_VAR"},
    )  # fmt: skip
    assert by_hand.returncode == 0, by_hand.stderr
