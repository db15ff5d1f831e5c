"""Reward terms as a registry: ReVSeg's box-only terms by hand, weights from config, a new term added by one
registration (and then in the breakdown, the step metrics and the evaluation summary), and consistency off
running no mask propagator."""

from __future__ import annotations

import json

import numpy as np
import pytest
from reward_scenes import synthetic_group

from veason_ray.config_loading import ConfigError, load_config
from veason_ray.eval_summary import summarise_results
from veason_ray.evaluation import ExpressionResult, reward_parts
from veason_ray.mask_propagation import MaskPropagator
from veason_ray.models.group_scoring import GroupInput, score_groups
from veason_ray.reward_scoring import score_response
from veason_ray.rewards import (
    REWARD_TERMS,
    RewardTerm,
    box_area_reward,
    box_hit_reward,
    ordered_parts,
    register_term,
    reward_weights,
    spatial_reward,
)
from veason_ray.training.rollout_batch import train_items

FRAME_INDICES = (0, 5, 10)


class RecordingPropagator(MaskPropagator):
    """Empty masks, and a record of every request."""

    def __init__(self) -> None:
        self.calls = 0

    def propagate(self, frames, keyframe_position, boxes):
        self.calls += 1
        return np.zeros(frames.shape[:3], dtype=bool)


class BoxPainter(MaskPropagator):
    def propagate(self, frames, keyframe_position, boxes):
        masks = np.zeros(frames.shape[:3], dtype=bool)
        for x1, y1, x2, y2 in np.round(boxes).astype(int):
            masks[:, max(y1, 0) : y2 + 1, max(x1, 0) : x2 + 1] = True
        return masks


def _answer(keyframe: int, boxes: list) -> str:
    return f"<think>t</think><answer>{json.dumps({'keyframe_timestamp': keyframe, 'bbox_2d_list': boxes})}</answer>"


def _scene():
    masks = np.zeros((3, 560, 560), dtype=bool)
    masks[1, 0:100, 0:100] = True  # 10,000 px, box area 99 * 99 + ...
    masks[2, 0:200, 0:200] = True
    boxes = [np.zeros((1, 4)), np.array([[0, 0, 100, 100]]), np.array([[0, 0, 200, 200]])]
    return masks, boxes, np.zeros((3, 560, 560, 3), dtype=np.uint8)


def test_box_hit_counts_matched_boxes_over_half_iou():
    gt = np.array([[0, 0, 9, 9], [50, 50, 59, 59]])
    pred = np.array([[0, 0, 9, 9], [52, 52, 61, 61], [200, 200, 209, 209]])  # IoU 1, 64/136, 0
    match = spatial_reward(pred, gt)
    assert box_hit_reward(match, len(gt)) == pytest.approx(1 / 3)  # one hit over max(3, 2)
    close = spatial_reward(np.array([[0, 0, 9, 9], [51, 51, 60, 60]]), gt)  # second IoU 81/119 > 0.5
    assert box_hit_reward(close, len(gt)) == 1.0
    assert box_hit_reward(spatial_reward(np.zeros((0, 4)), gt, num_predictions=2), len(gt)) == 0.0


def test_box_area_is_the_chosen_frames_gt_box_area_over_the_largest():
    _, boxes, _ = _scene()
    assert box_area_reward(10, FRAME_INDICES, boxes) == 1.0
    assert box_area_reward(5, FRAME_INDICES, boxes) == 0.25
    assert box_area_reward(0, FRAME_INDICES, boxes) == 0.0
    assert box_area_reward(7, FRAME_INDICES, boxes) == 0.0  # not sampled
    assert box_area_reward(5, FRAME_INDICES, [np.zeros((1, 4))] * 3) == 0.0  # no GT box anywhere


def test_weights_pick_the_scored_terms_and_unknown_ones_are_refused():
    masks, boxes, frames = _scene()
    weights = {"consistency": 0.0, "box_hit": 2.0, "box_area": 1.0}
    result = score_response(
        _answer(5, [[0, 0, 100, 100]]),
        frame_indices=FRAME_INDICES,
        gt_masks=masks,
        gt_boxes=boxes,
        frames=frames,
        propagator=(propagator := RecordingPropagator()),
        weights=weights,
    )
    assert propagator.calls == 0
    assert list(result.parts) == ["format", "keyframe", "spatial", "box_hit", "box_area"]
    assert result.parts["box_hit"] == 1.0 and result.parts["box_area"] == 0.25
    assert result.total == pytest.approx(2.0 + 0.25 + 1.0 + 2 * 1.0 + 0.25)
    assert result.consistency_error is None
    assert reward_weights({"box_hit": 1})["consistency"] == 1.0  # unnamed terms keep their default
    with pytest.raises(ValueError, match=r"reward.weights.iou: no reward term"):
        reward_weights({"iou": 1.0})
    with pytest.raises(ConfigError, match=r"reward.weights.iou"):
        load_config(None, ["reward.weights.iou=1"])
    with pytest.raises(ValueError, match=">= 0"):
        reward_weights({"format": -1.0})


def test_consistency_off_runs_no_mask_propagator():
    groups = [synthetic_group(g, seed=g, num_frames=4, answers=6, edge_cases=True) for g in range(3)]
    items = [GroupInput(group, rollouts, group.sample.frames) for group, rollouts in groups]
    off, on = RecordingPropagator(), RecordingPropagator()
    scored = score_groups(items, off, {"consistency": 0.0})
    for row in scored:
        for s in row:
            assert "consistency" not in s.reward.parts and s.reward.consistency_error is None
    assert any(s.reward.parts["spatial"] > 0 for row in scored for s in row)
    score_groups(items, on)  # with it on, the same answers do reach the propagator
    assert off.calls == 0 and on.calls > 0


def test_a_new_term_is_one_registration(monkeypatch):
    monkeypatch.setattr("veason_ray.rewards.REWARD_TERMS", dict(REWARD_TERMS))
    register_term(
        RewardTerm("brevity", lambda s: 1.0 if len(s.parsed.think) < 20 else 0.0, default_weight=0.5)
    )
    assert ordered_parts(["total", "brevity", "format"]) == ("format", "brevity", "total")
    groups = [synthetic_group(g, seed=g, num_frames=4, answers=4) for g in range(2)]
    items = [GroupInput(group, rollouts, group.sample.frames) for group, rollouts in groups]
    scored = score_groups(items, BoxPainter())
    reward = scored[0][0].reward
    assert reward.parts["brevity"] in (0.0, 1.0)
    assert reward.total == pytest.approx(sum(reward.parts.values()) - 0.5 * reward.parts["brevity"])
    _, metrics = train_items(
        [g for g, _ in groups], {g.group_id: row for (g, _), row in zip(groups, scored, strict=True)}
    )
    assert "reward/brevity" in metrics and "reward/consistency" in metrics
    results = [
        ExpressionResult("v", str(i), "e", 0, False, rewards=reward_parts(row[0].reward), j=0.5, f=0.5)
        for i, row in enumerate(scored)
    ]
    summary = summarise_results(
        results, benchmark="revos", split="valid", policy="p", answers="a", seconds=1.0, evaluated=2
    )
    assert list(summary["rewards"]) == ["format", "keyframe", "spatial", "consistency", "brevity", "total"]
    with pytest.raises(ValueError, match="exists already"):
        register_term(RewardTerm("format", lambda s: 0.0))
