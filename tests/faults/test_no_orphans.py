"""A driver that started a local Ray cluster and is SIGKILLed leaves nothing behind: GCS, the raylet and the
workers go with it, and the orphan reaper (`pipelines/orphan_reaper.py`) kills Ray's agents, which would
otherwise linger ~60 s trying to reach the dead GCS."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
from grpo_runs import REPO, grpo_env, session_processes

DRIVER = """
import os, time, ray
from pipelines.ray_runtime import init_ray
from veason_ray.config import PlacementConfig
init_ray(PlacementConfig(num_cpus=1))
@ray.remote
class Actor:
    def pid(self):
        return os.getpid()
actor = Actor.remote()
ray.get(actor.pid.remote())
from pipelines import ray_runtime
print("READY", ray_runtime._reaper.pid, flush=True)
time.sleep(600)
"""


def in_session(sid: int) -> list[str]:
    return [" ".join(p.info["cmdline"] or [])[:80] for p in session_processes(sid)]


def test_a_killed_driver_leaves_no_ray_process_behind():
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER], cwd=REPO, env=grpo_env(), stdout=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        line = driver.stdout.readline()
        assert line.startswith("READY"), line
        reaper = int(line.split()[1])
        assert any("DashboardAgent" in p for p in in_session(driver.pid)), in_session(driver.pid)
        os.kill(driver.pid, signal.SIGKILL)
        killed = time.monotonic()
        driver.wait()  # not a zombie of this test
        while (left := in_session(driver.pid)) or psutil.pid_exists(reaper):
            assert time.monotonic() - killed < 20, f"still there after 20 s: {left}"
            time.sleep(0.25)
    finally:
        driver.kill()
        driver.wait()
