"""Stopping a program a test started in its own session (`start_new_session=True`): a polite signal, a grace
period, then SIGKILL to the whole group, so nothing it started outlives the test."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_process_group(process: subprocess.Popen, first: int = signal.SIGTERM, grace_s: float = 60.0) -> None:
    """Send `first` (to the group for SIGTERM, to the leader otherwise), wait `grace_s`, then kill the group."""
    if process.poll() is None:
        if first == signal.SIGTERM:
            os.killpg(process.pid, first)
        else:
            process.send_signal(first)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
