"""Where the three pools run: Ray placement groups built from `placement.mode` and each pool's GPU share.

    colocated       one placement group of G = max(engines, learner ranks) bundles, one per GPU ({"GPU": 1,
                    "CPU": c}); rollout engine i, learner rank i and reward actor i go to bundle i mod G with
                    their fractional GPU demands, so they share the GPU through sleep/wake (rollout) and
                    fractions. The shares of one bundle must add up to at most 1 GPU.
    disaggregated   one placement group per pool: the rollout engines' bundles, the learner ranks' bundles and
                    the reward actors' (fractional) bundles are reserved apart, so rollout and learner never
                    share a GPU; weights travel over NCCL (`rollout.weight_transport=nccl`) on GPUs.

The same config runs on a CPU machine with logical GPUs (`placement.num_gpus`): Ray reserves and schedules
exactly as on a GPU node. With no GPU at all (every share 0) the bundles hold CPUs only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pipelines.ray_runtime import cluster_can_grow
from veason_ray.config import VeasonConfig


@dataclass
class Placement:
    """Per pool, the scheduling options of each of its actors (give them to the pools' constructors)."""

    rollout: list[dict[str, Any]]
    learner: list[dict[str, Any]]
    reward: list[dict[str, Any]]
    groups: list[PlacementGroup] = field(default_factory=list)
    description: str = ""

    def remove(self) -> None:
        for group in self.groups:
            remove_placement_group(group)
        self.groups = []


def _in(group: PlacementGroup, bundle: int) -> dict[str, Any]:
    return {
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=bundle, placement_group_capture_child_tasks=False
        )
    }


def _bundle(gpus: float, cpus: float) -> dict[str, float]:
    bundle = {"CPU": max(cpus, 0.001)}
    if gpus > 0:
        bundle["GPU"] = gpus
    return bundle


# the keys that ask for each resource of a bundle
RESOURCE_KEYS = {
    "CPU": "rollout.cpus_per_engine, learner.cpus_per_worker, reward.cpus_per_actor",
    "GPU": "rollout.gpus_per_engine, learner.gpus_per_worker, reward.gpus_per_actor",
}


def shortage(bundles: list[dict[str, float]], cluster: dict[str, float]) -> str:
    """What the cluster lacks for `bundles`: each resource whose total asked exceeds the cluster's total, with
    the keys that ask for it ("" when every total fits: the cluster is busy, its nodes are too small for a
    bundle, or an autoscaler is still adding nodes)."""
    asked: dict[str, float] = {}
    for bundle in bundles:
        for name, amount in bundle.items():
            asked[name] = asked.get(name, 0.0) + amount
    short = [
        f"{name} {amount:g} asked, {cluster.get(name, 0.0):g} in the cluster"
        + (f" (keys: {RESOURCE_KEYS[name]})" if name in RESOURCE_KEYS else "")
        for name, amount in sorted(asked.items())
        if amount > cluster.get(name, 0.0) + 1e-9
    ]
    return "; ".join(short)


def _ready(groups: dict[str, PlacementGroup], timeout_s: float) -> list[PlacementGroup]:
    """Wait for every group, all asked for at once (an autoscaler sees the whole demand and boots the nodes for
    it together); on the deadline every group is removed and the first one not reserved is explained."""
    started = time.monotonic()
    deadline = started + timeout_s
    if not cluster_can_grow():  # a local cluster: what it lacks now it will always lack
        asked = [b for group in groups.values() for b in group.bundle_specs]
        if shortage(asked, ray.cluster_resources()):
            deadline = started
    for what, group in groups.items():
        try:
            ray.get(group.ready(), timeout=max(deadline - time.monotonic(), 0.0))
        except ray.exceptions.GetTimeoutError:
            for other in groups.values():
                remove_placement_group(other)
            raise RuntimeError(_refusal(what, group, time.monotonic() - started)) from None
    return list(groups.values())


def _refusal(what: str, group: PlacementGroup, waited_s: float) -> str:
    short = shortage(group.bundle_specs, ray.cluster_resources())
    if short:
        reason = (
            f"the cluster is short of {short}; lower those shares or add nodes with the resource "
            "(placement.num_cpus / placement.num_gpus size a local cluster only)"
        )
    else:
        reason = (
            "every resource exists in the cluster, but not free or not on one node for each bundle: "
            "wait for running jobs, or lower rollout/learner/reward's cpus_* and gpus_* shares"
        )
    return (
        f"placement: the cluster cannot reserve {what} ({group.bundle_specs}), waited {waited_s:.0f} s "
        f"(placement.timeout_s): {reason}"
    )


def build_placement(cfg: VeasonConfig, timeout_s: float | None = None) -> Placement:
    """Reserve the placement groups of `placement.mode` and say where each actor goes, waiting at most
    `timeout_s` (default `placement.timeout_s`)."""
    timeout_s = cfg.placement.timeout_s if timeout_s is None else timeout_s
    ro, le, re = cfg.rollout, cfg.learner, cfg.reward
    rollout_gpus = ro.gpus_per_engine * ro.tensor_parallel_size
    if cfg.placement.mode == "colocated":
        return _colocated(cfg, rollout_gpus, timeout_s)
    if cfg.placement.mode != "disaggregated":
        raise ValueError(f"placement.mode: unknown {cfg.placement.mode!r}; colocated or disaggregated")
    pools = {
        name: placement_group([_bundle(gpus, cpus)] * count, strategy="PACK")
        for name, count, gpus, cpus in (
            ("rollout", ro.engines, rollout_gpus, ro.cpus_per_engine),
            ("learner", le.workers, le.gpus_per_worker, le.cpus_per_worker),
            ("reward", re.actors, re.gpus_per_actor, re.cpus_per_actor),
        )
    }
    groups = _ready(pools, timeout_s)
    options = {name: [_in(group, i) for i in range(len(group.bundle_specs))] for name, group in pools.items()}
    return Placement(
        groups=groups,
        description=(
            f"disaggregated: rollout {ro.engines} x {rollout_gpus:g} GPU, learner {le.workers} x "
            f"{le.gpus_per_worker:g} GPU, reward {re.actors} x {re.gpus_per_actor:g} GPU"
        ),
        **options,
    )


def _colocated(cfg: VeasonConfig, rollout_gpus: float, timeout_s: float) -> Placement:
    ro, le, re = cfg.rollout, cfg.learner, cfg.reward
    # One bundle per GPU that hosts an engine or a learner rank; reward actors spread over those bundles.
    count = max(ro.engines, le.workers, 1)
    members = [([], [], []) for _ in range(count)]  # per bundle: rollout, learner, reward actor indices
    for pool, total in enumerate((ro.engines, le.workers, re.actors)):
        for i in range(total):
            members[i % count][pool].append(i)
    bundles = []
    for index, (engines, ranks, rewards) in enumerate(members):
        gpus = (
            len(engines) * rollout_gpus + len(ranks) * le.gpus_per_worker + len(rewards) * re.gpus_per_actor
        )
        if gpus > 1 + 1e-9:
            raise ValueError(
                f"placement.mode=colocated: GPU {index} would hold {gpus:g} GPUs of actors (rollout "
                f"{len(engines)} x {rollout_gpus:g}, learner {len(ranks)} x {le.gpus_per_worker:g}, reward "
                f"{len(rewards)} x {re.gpus_per_actor:g}); lower the shares so each GPU adds up to <= 1"
            )
        cpus = (
            len(engines) * ro.cpus_per_engine
            + len(ranks) * le.cpus_per_worker
            + len(rewards) * re.cpus_per_actor
        )
        # A bundle that holds any GPU share reserves the whole GPU: nothing else may land on it.
        bundles.append(_bundle(math.ceil(gpus) if gpus > 0 else 0, cpus))
    (group,) = _ready({"the colocated GPUs": placement_group(bundles, strategy="PACK")}, timeout_s)
    return Placement(
        rollout=[_in(group, i % count) for i in range(ro.engines)],
        learner=[_in(group, i % count) for i in range(le.workers)],
        reward=[_in(group, i % count) for i in range(re.actors)],
        groups=[group],
        description=(
            f"colocated on {count} bundle(s): rollout {rollout_gpus:g} + learner {le.gpus_per_worker:g} + "
            f"reward {re.gpus_per_actor:g} GPU each"
        ),
    )
