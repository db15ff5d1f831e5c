"""A benchmark script run as a test runs it: its own process and session (its local Ray cluster inside),
the CPU environment, killed with everything it started if it outlives its deadline; its `--out` JSON back."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

from process_groups import stop_process_group

from actors.rollout import CPU_VLLM_ENV

REPO = Path(__file__).resolve().parents[1]
CPU_ENV = {
    **CPU_VLLM_ENV,
    "RAY_AUTH_MODE": "disabled",
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TQDM_DISABLE": "1",
}


def run_benchmark(script: str, args: list[str], folder: Path, timeout_s: float) -> dict:
    """`python <script> <args> --out <folder>/<name>.json` from the repository root; the JSON it wrote. A
    failure shows the end of its console output (kept in `<folder>/<name>.log`)."""
    name = Path(script).stem
    out, log = folder / f"{name}.json", folder / f"{name}.log"
    env = {**os.environ, **CPU_ENV}
    env.pop("RAY_ADDRESS", None)
    with log.open("w") as stream:
        process = subprocess.Popen(
            [sys.executable, script, *args, "--out", str(out)],
            cwd=REPO,
            env=env,
            stdout=stream,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout_s)
    finally:
        stop_process_group(process, grace_s=30)  # past the deadline, or interrupted: it and all it started
    assert process.returncode == 0, f"{script} exited with {process.returncode}:\n{log.read_text()[-4000:]}"
    return json.loads(out.read_text())
