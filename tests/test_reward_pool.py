"""SAM2RewardPool on a local Ray cluster with logical GPUs (fractional-GPU actors schedule as on a GPU node)
and a random-init SAM2 at 256 px: rewards equal the method core's `score_response`, a killed actor's groups
still come back, a hung actor is restarted, and a group that keeps failing is scored without SAM2."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from reward_scenes import max_reward_difference, synthetic_group

from actors.reward import SAM2RewardPool, SAM2RewardWorker
from veason_ray.config import RewardConfig, SAM2Config
from veason_ray.models.loading import load_sam2_video_predictor
from veason_ray.models.sam2_propagator import SAM2MaskPropagator
from veason_ray.models.tiny_sam2 import write_tiny_sam2
from veason_ray.reward_scoring import score_response

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def sam2_dir(tmp_path_factory) -> Path:
    return write_tiny_sam2(tmp_path_factory.mktemp("sam2"), seed=0)


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    # The fault-injecting workers below live in this test module, which Ray workers cannot import.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


def _cfg(sam2_dir: Path, **overrides) -> RewardConfig:
    base = RewardConfig(
        sam2=SAM2Config(checkpoint=str(sam2_dir), config=""),
        actors=2,
        gpus_per_actor=0.25,
        cpus_per_actor=0.5,
        timeout_s=60.0,
        max_retries=2,
    )
    return dataclasses.replace(base, **overrides)


def _groups(count: int, answers: int = 4):
    return [
        synthetic_group(i, seed=20 + i, num_frames=3, num_objects=1 + i % 2, answers=answers)
        for i in range(count)
    ]


def _expected(sam2_dir: Path, groups):
    plain = SAM2MaskPropagator(load_sam2_video_predictor(str(sam2_dir)))
    return [
        [
            score_response(
                r.text,
                frame_indices=g.sample.frame_indices,
                gt_masks=g.sample.gt_masks_560,
                gt_boxes=g.sample.gt_boxes_560,
                frames=g.sample.frames,
                propagator=plain,
            )
            for r in rollouts
        ]
        for g, rollouts in groups
    ]


@pytest.fixture(scope="module")
def pool(local_ray, sam2_dir):
    pool = SAM2RewardPool(_cfg(sam2_dir))
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def scene(sam2_dir):
    groups = _groups(3, answers=5)
    return groups, _expected(sam2_dir, groups)


def test_pooled_rewards_equal_the_method_core(pool, scene):
    groups, expected = scene
    # Frames travel by reference for half the groups, as the GRPO driver sends them.
    sent = [
        (
            dataclasses.replace(g, sample=dataclasses.replace(g.sample, frames=ray.put(g.sample.frames)))
            if i % 2
            else g
        )
        for i, (g, _) in enumerate(groups)
    ]
    scored = pool.score(sent, [rollouts for _, rollouts in groups])
    for (_, rollouts), got, want in zip(groups, scored, expected, strict=True):
        assert [s.rollout for s in got] == rollouts
        assert max_reward_difference([s.reward for s in got], want) <= 1e-4  # batched SAM2: rounding only
        assert all(s.notes["reward_attempts"] == 1 and "reward_failure" not in s.notes for s in got)
    assert any(s.reward.parts["consistency"] > 0 for got in scored for s in got)


def test_killing_an_actor_mid_batch_still_yields_every_reward(pool, scene):
    groups, expected = scene
    tickets = [pool.submit(g, rollouts) for g, rollouts in groups]
    time.sleep(0.5)
    ray.kill(pool.actors[0], no_restart=False)
    got = {}
    for scored in pool.results():
        got[scored[0].rollout.group_id] = scored
    assert len(tickets) == len(got) == len(groups) and pool.pending == 0
    for (group, _), want in zip(groups, expected, strict=True):
        assert max_reward_difference([s.reward for s in got[group.group_id]], want) <= 1e-4
    attempts = [s.notes["reward_attempts"] for scored in got.values() for s in scored]
    assert max(attempts) >= 2 and all(
        "reward_failure" not in s.notes for scored in got.values() for s in scored
    )


class CrashingWorker(SAM2RewardWorker):
    """A worker whose process dies on every call."""

    def __init__(self, *args, **kwargs):
        pass

    def ready(self) -> str:
        return f"{os.getpid()}:cpu"

    def score(self, group, rollouts):
        os._exit(1)


class HangOnceWorker(SAM2RewardWorker):
    """Hangs on its first call ever (a marker file survives the restart), then works."""

    def score(self, group, rollouts):
        marker = Path(self.cfg.sam2.checkpoint) / "hung-once"
        if not marker.exists():
            marker.touch()
            time.sleep(3600)
        return super().score(group, rollouts)


def test_a_group_that_keeps_failing_gets_consistency_zero_with_the_reason(local_ray, sam2_dir, scene):
    groups, expected = scene
    group, rollouts = groups[1]
    pool = SAM2RewardPool(_cfg(sam2_dir, actors=1, max_retries=1), worker=CrashingWorker)
    try:
        start = time.monotonic()
        [scored] = pool.score([group], [rollouts])
        assert time.monotonic() - start < 60
    finally:
        pool.shutdown()
    for s, want in zip(scored, expected[1], strict=True):
        assert s.notes["reward_attempts"] == 2 and "reward actor died" in s.notes["reward_failure"]
        assert {k: v for k, v in s.reward.parts.items() if k != "consistency"} == {
            k: v for k, v in want.parts.items() if k != "consistency"
        }
        assert s.reward.parts["consistency"] == 0.0
        if want.consistency_error is None and want.matched_pairs:  # SAM2 was needed: the reason is given
            assert s.reward.consistency_error.startswith("reward pool gave up after 2 attempts")


def test_a_hung_actor_is_restarted_and_its_group_retried(local_ray, sam2_dir, scene):
    groups, expected = scene
    group, rollouts = groups[0]
    pool = SAM2RewardPool(
        _cfg(sam2_dir, actors=1, timeout_s=8.0), worker=HangOnceWorker, start_timeout_s=60.0
    )
    try:
        [scored] = pool.score([group], [rollouts])
    finally:
        pool.shutdown()
    assert all(s.notes["reward_attempts"] == 2 for s in scored)
    assert max_reward_difference([s.reward for s in scored], expected[0]) <= 1e-4
    assert np.isfinite([s.reward.total for s in scored]).all()


def test_consistency_off_loads_no_sam2(local_ray, sam2_dir):
    """`reward.weights.consistency=0`: the actors never build a mask propagator, never import sam2, and the
    groups still get format, keyframe and spatial exactly as the method core gives them."""
    groups = _groups(2)
    pool = SAM2RewardPool(_cfg(sam2_dir, actors=1, weights={"consistency": 0.0}))
    try:
        scored = pool.score([g for g, _ in groups], [r for _, r in groups])
        actor = pool.actors[0]
        propagator, imported = ray.get(
            actor.__ray_call__.remote(lambda worker: (worker.propagator, "sam2" in sys.modules)), timeout=60
        )
    finally:
        pool.shutdown()
    assert propagator is None and imported is False
    for (group, rollouts), got in zip(groups, scored, strict=True):
        for rollout, s in zip(rollouts, got, strict=True):
            want = score_response(
                rollout.text,
                frame_indices=group.sample.frame_indices,
                gt_masks=group.sample.gt_masks_560,
                gt_boxes=group.sample.gt_boxes_560,
                weights={"consistency": 0.0},
            )
            assert s.reward == want and "consistency" not in s.reward.parts
