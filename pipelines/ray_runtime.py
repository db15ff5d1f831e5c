"""Connecting a driver to Ray: an existing cluster (RAY_ADDRESS, `ray job submit`, `placement.ray_address`)
or a local one started on this machine with the CPUs and (logical) GPUs the config names."""

from __future__ import annotations

import os
import subprocess

import ray

from pipelines.orphan_reaper import start_reaper
from veason_ray.config import PlacementConfig

_started_here = False  # this process started a local cluster: nothing will add nodes to it
_reaper: subprocess.Popen | None = None  # kills the local cluster's leftovers once this process is gone


def cluster_can_grow() -> bool:
    """Whether nodes may still join the connected cluster (a cluster this process joined may autoscale; a local
    one it started cannot)."""
    return not _started_here


def init_ray(placement: PlacementConfig) -> None:
    """Idempotent. A local cluster gets `placement.num_cpus` / `num_gpus` (0 = detect); on a CPU machine
    `num_gpus` > 0 declares logical GPUs so fractional-GPU pools schedule exactly as on a GPU node."""
    if ray.is_initialized():
        return
    address = placement.ray_address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # A local, single-user cluster on this machine: Ray 2.60's token auth guards nothing here.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    global _started_here, _reaper
    _started_here = True
    context = ray.init(
        num_cpus=placement.num_cpus or None,
        num_gpus=placement.num_gpus or None,
        include_dashboard=False,
        log_to_driver=True,
    )
    # if this process is killed, nothing of its cluster outlives it by more than a few seconds
    _reaper = start_reaper(context.address_info["session_dir"])
