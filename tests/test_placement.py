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


def test_a_cpu_shortage_names_the_cpus_and_the_keys_that_ask_for_them(cluster):
    # the 16-CPU cluster above: 3 engines x 8 CPUs cannot be reserved, whatever the GPUs
    cfg = load_config(
        "tests/configs/small.yaml",
        ["rollout.engines=3", "rollout.cpus_per_engine=8", "placement.mode=disaggregated"],
    )
    with pytest.raises(RuntimeError) as refused:
        build_placement(cfg, timeout_s=2)
    message = str(refused.value)
    assert "short of CPU 24 asked, 16 in the cluster" in message
    assert "rollout.cpus_per_engine" in message and "GPU" not in message.split("short of")[1].split(";")[0]


def test_a_local_cluster_that_cannot_grow_is_refused_at_once(cluster, monkeypatch):
    # a cluster this process started has no autoscaler: the placement does not wait placement.timeout_s for it
    monkeypatch.setattr("pipelines.placement.cluster_can_grow", lambda: False)
    cfg = load_config("tests/configs/small.yaml", ["rollout.engines=3", "rollout.cpus_per_engine=8"])
    assert cfg.placement.timeout_s == 900.0
    with pytest.raises(
        RuntimeError, match=r"waited 0 s \(placement.timeout_s\): the cluster is short of CPU"
    ):
        build_placement(cfg)


def test_shortage_lists_each_short_resource_or_nothing_when_all_fit():
    from pipelines.placement import shortage

    bundles = [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}]
    assert shortage(bundles, {"CPU": 8.0, "GPU": 2.0}) == ""
    both = shortage(bundles, {"CPU": 3.0, "GPU": 1.0})
    assert both.startswith("CPU 4 asked, 3 in the cluster (keys: rollout.cpus_per_engine")
    assert "GPU 2 asked, 1 in the cluster (keys: rollout.gpus_per_engine" in both
