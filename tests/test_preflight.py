"""Mistakes in what a program reads are refused before it starts Ray: one message naming the key, the value and
the fix, a non-zero exit, no traceback (the rows of issue 23's table, each through the real command line)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def veason(
    *argv: str, env: dict | None = None, cwd: Path = REPO
) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *argv], cwd=cwd, capture_output=True, text=True, timeout=120,
        env={**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO), **(env or {})},
    )  # fmt: skip
    return done, time.monotonic() - started


@pytest.fixture(scope="module")
def demo_inputs(tmp_path_factory, synthetic_revos):
    from veason_ray.models.tiny_qwen import write_tiny_qwen
    from veason_ray.models.tiny_sam2 import write_tiny_sam2

    folder = tmp_path_factory.mktemp("preflight")
    return {
        "data": synthetic_revos,
        "policy": write_tiny_qwen(folder / "qwen2_5_vl_tiny", seed=0),
        "sam2": write_tiny_sam2(folder / "sam2_tiny"),
        "folder": folder,
    }


def _grpo(inputs: dict, *overrides: str, env: dict | None = None):
    base = [f"data.root={inputs['data']}", f"model.policy={inputs['policy']}",
            f"reward.sam2.checkpoint={inputs['sam2']}", f"run.output_dir={inputs['folder'] / 'run'}"]  # fmt: skip
    return veason("grpo", "tests/configs/small.yaml", *base, *overrides, env=env)


def refused(done: subprocess.CompletedProcess, seconds: float, *needles: str) -> None:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "Started a local Ray instance" not in done.stderr + done.stdout  # refused before Ray started
    assert seconds < 60  # interpreter, imports and the checks: seconds, never a pool's start-up
    for needle in needles:
        assert needle in done.stderr, done.stderr[-3000:]


def test_a_missing_data_root_names_the_key_and_the_fix(demo_inputs, tmp_path):
    done, seconds = _grpo(demo_inputs, f"data.root={tmp_path}/nowhere")
    refused(
        done,
        seconds,
        "veason grpo: cannot start:",
        f"data.root={tmp_path}/nowhere: no such folder",
        "make demo",
    )


def test_a_truncated_expression_file_names_the_key_and_the_file(demo_inputs, tmp_path):
    import shutil

    root = tmp_path / "revos"
    shutil.copytree(demo_inputs["data"], root)
    meta = root / "meta_expressions_train_.json"
    meta.write_text(meta.read_text()[:100])
    done, seconds = _grpo(demo_inputs, f"data.root={root}")
    refused(
        done, seconds, f"data.root={root} (data.dataset=revos, split train)", "meta_expressions_train_.json"
    )


def test_an_s3_root_without_a_server_fails_in_seconds(demo_inputs):
    done, seconds = _grpo(
        demo_inputs, "data.root=s3://bucket/revos", "storage.endpoint_url=http://127.0.0.1:9"
    )
    refused(
        done, seconds, "data.root=s3://bucket/revos: object storage did not answer", "storage.endpoint_url"
    )


def test_a_policy_folder_without_weights_names_model_policy(demo_inputs, tmp_path):
    empty = tmp_path / "policy"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    done, seconds = _grpo(demo_inputs, f"model.policy={empty}")
    refused(done, seconds, f"model.policy={empty}: no weights in the folder")


def test_a_fresh_clone_before_make_demo_is_told_to_run_it(tmp_path):
    # a checkout without runs/ (make demo writes it): the demo config's relative paths, from an empty folder
    done, seconds = veason("grpo", str(REPO / "tests/configs/small.yaml"), cwd=tmp_path)
    refused(
        done,
        seconds,
        "data.root=runs/demo/data/revos: no such folder",
        "model.policy=runs/demo/models/qwen2_5_vl_tiny: no such folder",
        "`make demo`",
    )


def test_zero_responses_per_prompt_is_refused_as_a_config_value(demo_inputs):
    done, seconds = _grpo(demo_inputs, "rollout.n=0")
    refused(done, seconds, "veason grpo: rollout.n=0: must be >= 1")


def test_eval_checks_its_split_and_a_missing_sam2(demo_inputs, tmp_path):
    done, seconds = veason(
        "eval", "tests/configs/small.yaml", f"data.root={demo_inputs['data']}", f"model.policy={demo_inputs['policy']}",
        f"reward.sam2.checkpoint={tmp_path}/sam2", f"run.output_dir={tmp_path}/run", "eval.split=test",
    )  # fmt: skip
    refused(
        done,
        seconds,
        "veason eval: cannot start:",
        "split test",
        f"reward.sam2.checkpoint={tmp_path}/sam2: no such file or folder",
    )
