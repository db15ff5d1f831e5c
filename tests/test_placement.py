"""Placement groups of the GRPO driver from the shipped configs, on a local Ray cluster with logical GPUs."""

from __future__ import annotations

import os
import time

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402

from pipelines.placement import build_placement  # noqa: E402
from veason_ray.config_loading import load_config  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=16, num_gpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_one_gpu_config_puts_all_three_pools_on_one_gpu(cluster):
    placement = build_placement(load_config("configs/qwen2.5vl-3b-1gpu.yaml", []), timeout_s=30)
    try:
        assert [g.bundle_specs for g in placement.groups] == [[{"CPU": 4.0, "GPU": 1.0}]]
        strategies = placement.rollout + placement.learner + placement.reward
        assert {s["scheduling_strategy"].placement_group_bundle_index for s in strategies} == {0}
        assert len(placement.reward) == 2
    finally:
        placement.remove()


def test_disaggregated_config_reserves_separate_gpus_per_pool(cluster):
    cfg = load_config("configs/qwen2.5vl-3b-cluster.yaml", [])
    placement = build_placement(cfg, timeout_s=30)
    try:
        specs = [g.bundle_specs for g in placement.groups]
        assert specs[0] == [{"CPU": 1.0, "GPU": 1.0}]  # the rollout engine
        assert specs[1] == [{"CPU": 1.0, "GPU": 1.0}] * 2  # two learner ranks
        assert specs[2] == [{"CPU": 1.0, "GPU": 0.25}] * 4  # SAM2 actors share the last GPU
        # ray.available_resources() is refreshed asynchronously after a reservation: poll it
        deadline = time.monotonic() + 10
        while ray.available_resources().get("GPU", 0) > 1e-6 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ray.available_resources().get("GPU", 0) == pytest.approx(0.0)
    finally:
        placement.remove()


def test_colocated_shares_over_one_gpu_are_refused_with_the_fields_to_change():
    cfg = load_config("configs/qwen2.5vl-3b-1gpu.yaml", ["learner.gpus_per_worker=0.8"])
    with pytest.raises(ValueError, match="learner 1 x 0.8.*lower the shares"):
        build_placement(cfg)
