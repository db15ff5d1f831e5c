"""Reaps what a killed driver's local Ray cluster leaves behind.

A driver that starts a local cluster (`pipelines/ray_runtime.py`) takes GCS, the raylet and the workers down
with it, even under SIGKILL; Ray's DashboardAgent and RuntimeEnvAgent notice their raylet died within ~3 s but
then try to report it to the dead GCS for 60 s (measured with Ray 2.60) before they exit. This process, started
beside such a driver in a session of its own, waits for the driver to go (its stdin, a pipe only the driver
holds, reaches end of file, and the driver's process is gone: a pipe may also close while the interpreter
shuts down), gives Ray `GRACE_S` to stop its own processes, then kills every process that
names the cluster's session folder on its command line or holds a file open in it (Ray's processes retitle
themselves, "ray::DashboardAgent", but keep their logs in the session folder open).

    python -m pipelines.orphan_reaper SESSION_DIR DRIVER_PID     # stdin: a pipe from the driver
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

GRACE_S = 3.0  # a clean ray.shutdown() has stopped everything by then


def session_processes(session_dir: str) -> list[psutil.Process]:
    """The live processes (not this one) whose command line names `session_dir` or that hold a file in it."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if process.pid == os.getpid():
            continue
        try:
            named = any(session_dir in part for part in process.info["cmdline"] or [])
            if named or any(f.path.startswith(session_dir) for f in process.open_files()):
                found.append(process)
        except psutil.Error:  # gone meanwhile, or not ours to inspect
            continue
    return found


def reap(session_dir: str) -> int:
    """Kill what is left of the cluster in `session_dir`; returns how many processes were killed."""
    left = session_processes(session_dir)
    for process in left:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=5)
    return len(left)


def wait_gone(pid: int) -> None:
    """Until process `pid` has exited (a zombie counts as exited)."""
    try:
        process = psutil.Process(pid)
        while process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.2)
    except psutil.Error:  # gone
        pass


def start_reaper(session_dir: str) -> subprocess.Popen:
    """A reaper for the local cluster in `session_dir`, watching this process. It gets the read end of a pipe
    whose write end only this process holds (pipes are not inherited by the processes Ray spawns), so it sees
    end of file the moment this process exits, however it exits."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.orphan_reaper", session_dir, str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # outlives a kill of the driver's process group
    )


def main() -> None:
    session_dir, driver = sys.argv[1], int(sys.argv[2])
    while sys.stdin.buffer.read(65536):  # the driver never writes: this returns as it exits
        pass
    wait_gone(driver)
    time.sleep(GRACE_S)
    reap(session_dir)


if __name__ == "__main__":
    main()
