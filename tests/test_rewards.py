"""Every reward part with hand-worked numbers, its empty / degenerate cases, and score_response (the release's
rules unless a test says otherwise; tests/test_reward_rules.py holds what each rule changes)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from veason_ray.answer_parsing import ParseFailureReason, parse_answer
from veason_ray.mask_propagation import MaskPropagator
from veason_ray.reward_rules import STRICT_RULES
from veason_ray.reward_scoring import score_response
from veason_ray.rewards import format_reward, keyframe_reward, mask_consistency, spatial_reward

FRAME_INDICES = (0, 5, 10, 15)


def _response(keyframe: object, boxes: object, think: str = "t") -> str:
    return f"<think>{think}</think><answer>{json.dumps({'keyframe_timestamp': keyframe, 'bbox_2d_list': boxes})}</answer>"


class FixedPropagator(MaskPropagator):
    """Returns preset masks and records what it was asked."""

    def __init__(self, masks: np.ndarray) -> None:
        self.masks = masks
        self.calls: list[tuple[int, np.ndarray]] = []

    def propagate(self, frames: np.ndarray, keyframe_position: int, boxes: np.ndarray) -> np.ndarray:
        self.calls.append((keyframe_position, boxes))
        return self.masks


class BoxPropagator(MaskPropagator):
    """The boxes, filled, on every frame: a perfect tracker of a static object."""

    def propagate(self, frames: np.ndarray, keyframe_position: int, boxes: np.ndarray) -> np.ndarray:
        masks = np.zeros(frames.shape[:3], dtype=bool)
        for x1, y1, x2, y2 in np.round(boxes).astype(int):
            masks[:, y1 : y2 + 1, x1 : x2 + 1] = True
        return masks


class FailingPropagator(MaskPropagator):
    def propagate(self, frames: np.ndarray, keyframe_position: int, boxes: np.ndarray) -> np.ndarray:
        raise RuntimeError("CUDA out of memory")


def _scene() -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """4 sampled frames at 560x560 with one static 10x10 object at x, y in [100, 109] (absent on frame 0)."""
    gt_masks = np.zeros((4, 560, 560), dtype=bool)
    gt_masks[1:, 100:110, 100:110] = True
    gt_boxes = [np.zeros((1, 4))] + [np.array([[100.0, 100.0, 109.0, 109.0]])] * 3
    frames = np.zeros((4, 560, 560, 3), dtype=np.uint8)
    return gt_masks, gt_boxes, frames


# ---- format ---------------------------------------------------------------------------------------------
def test_format_reward_hand_worked():
    assert format_reward(_response(5, [[1, 2, 3, 4]])) == 2.0
    assert format_reward(_response(5, [])) == 1.0  # empty list: n = 1, nothing added
    assert format_reward(_response(5, [[1, 2, 3, 4], [1, 2, 3], "x", [1, 2, 3, 4.5]])) == 1.5  # 2 of 4
    assert format_reward(_response(5, [[1, 2, 3, 4]]) + "\n") == 1.0  # trailing text: no tag point
    assert format_reward('<answer>{"keyframe_timestamp": 1, "bbox_2d_list": [[1, 2, 3, 4]]}</answer>') == 1.0
    assert format_reward("<think>t</think><answer>not json</answer>") == 1.0  # parse failure: tags only
    assert format_reward(_response(1.5, [[1, 2, 3, 4]])) == 1.0  # keyframe not an integer
    assert format_reward("plain text") == 0.0
    assert format_reward(parse_answer(_response(5, [[1, 2, 3, 4]]))) == 2.0


# ---- keyframe -------------------------------------------------------------------------------------------
def test_keyframe_reward_hand_worked():
    masks = np.zeros((4, 10, 10), dtype=bool)
    masks[1].flat[:10] = True  # areas 0, 10, 40, 20 at frames 0, 5, 10, 15
    masks[2].flat[:40] = True
    masks[3].flat[:20] = True
    assert keyframe_reward(5, FRAME_INDICES, masks) == 0.25
    assert keyframe_reward(10, FRAME_INDICES, masks) == 1.0
    assert keyframe_reward(15, FRAME_INDICES, masks) == 0.5
    assert keyframe_reward(0, FRAME_INDICES, masks) == 0.0
    assert keyframe_reward(7, FRAME_INDICES, masks) == 0.0  # not a sampled frame
    assert keyframe_reward(-5, FRAME_INDICES, masks) == 0.0
    assert keyframe_reward(10**30, FRAME_INDICES, masks) == 0.0
    assert keyframe_reward(10, FRAME_INDICES, np.zeros((4, 10, 10), dtype=bool)) == 0.0  # no GT anywhere


# ---- spatial --------------------------------------------------------------------------------------------
def test_spatial_reward_hand_worked():
    exact = spatial_reward(np.array([[0, 0, 9, 9]]), np.array([[0, 0, 9, 9]]))
    assert exact.reward == 1.0 and exact.pairs.tolist() == [[0, 0]]
    assert spatial_reward(np.array([[0, 0, 9, 9]]), np.array([[5, 5, 14, 14]])).reward == pytest.approx(1 / 7)
    # One GT, two predictions: the extra one matches nothing -> (1 + 0) / 2.
    extra = spatial_reward(np.array([[0, 0, 9, 9], [100, 100, 109, 109]]), np.array([[0, 0, 9, 9]]))
    assert extra.reward == 0.5 and extra.pairs.tolist() == [[0, 0]]
    # Two GT, one prediction -> 1 / 2.
    assert spatial_reward(np.array([[0, 0, 9, 9]]), np.array([[0, 0, 9, 9], [50, 50, 59, 59]])).reward == 0.5
    # Invalid entries count as predictions: one exact box out of 2 entries -> 1 / 2.
    assert spatial_reward(np.array([[0, 0, 9, 9]]), np.array([[0, 0, 9, 9]]), num_predictions=2).reward == 0.5
    assert spatial_reward(np.zeros((0, 4)), np.array([[0, 0, 9, 9]]), num_predictions=3).reward == 0.0


def test_spatial_reward_is_a_global_assignment():
    # P0 overlaps both GT boxes by a third, P1 equals G0. Best: P1-G0 (1) + P0-G1 (1/3), over 2 boxes.
    pred = np.array([[5, 0, 14, 9], [0, 0, 9, 9]])
    gt = np.array([[0, 0, 9, 9], [10, 0, 19, 9]])
    match = spatial_reward(pred, gt)
    assert match.reward == pytest.approx((1 + 1 / 3) / 2)
    assert sorted(match.pairs.tolist()) == [[0, 1], [1, 0]]


def test_spatial_reward_placeholders_and_cap():
    # No target on the frame: GT [[0, 0, 0, 0]]; predicting the placeholder box scores 1 (release convention).
    assert spatial_reward(np.zeros((1, 4)), np.zeros((1, 4))).reward == 1.0
    assert spatial_reward(np.array([[0, 0, 9, 9]]), np.zeros((1, 4))).reward == pytest.approx(1 / 100)
    # 130 copies of the right box: only the first 120 count as predictions -> 1 / 120.
    many = np.tile([[0, 0, 9, 9]], (130, 1))
    assert spatial_reward(many, np.array([[0, 0, 9, 9]]), num_predictions=130).reward == pytest.approx(
        1 / 120
    )


# ---- consistency ----------------------------------------------------------------------------------------
def test_mask_consistency_hand_worked():
    gt = np.zeros((3, 4, 4), dtype=bool)
    gt[0, 0, :2] = True
    gt[1, 0, :4] = True
    pred = np.zeros((3, 4, 4), dtype=bool)
    pred[0, 0, :2] = True  # IoU 1
    pred[1, 0, :2] = True  # IoU 2 / 4
    # frame 2: both empty -> 1
    assert mask_consistency(pred, gt) == pytest.approx((1 + 0.5 + 1) / 3)


def test_consistency_sends_the_matched_boxes_as_float32_from_the_keyframe():
    gt_masks, gt_boxes, frames = _scene()
    propagator = FixedPropagator(gt_masks)
    result = score_response(
        _response(5, [[100, 100, 109, 109]]),
        frame_indices=FRAME_INDICES,
        gt_masks=gt_masks,
        gt_boxes=gt_boxes,
        frames=frames,
        propagator=propagator,
    )
    position, sent = propagator.calls[0]
    assert position == 1 and sent.dtype == np.float32 and sent.tolist() == [[100, 100, 109, 109]]
    assert result.parts["consistency"] == 1.0


def test_consistency_without_boxes_does_not_call_the_propagator():
    gt_masks, gt_boxes, frames = _scene()
    propagator = FixedPropagator(np.ones((4, 560, 560), dtype=bool))
    result = score_response(
        _response(5, []),
        frame_indices=FRAME_INDICES,
        gt_masks=gt_masks,
        gt_boxes=gt_boxes,
        frames=frames,
        propagator=propagator,
        rules=STRICT_RULES,  # the release scores an empty list 0 (test_reward_rules.py)
    )
    assert result.parts["consistency"] == 0.25 and propagator.calls == []  # empty vs empty on frame 0


def test_consistency_resizes_propagated_masks_to_the_gt_size():
    assert mask_consistency(np.ones((1, 4, 4), dtype=bool), np.ones((1, 8, 8), dtype=bool)) == 1.0
    with pytest.raises(ValueError):
        mask_consistency(np.ones((2, 4, 4)), np.ones((1, 8, 8), dtype=bool))
    gt_masks, gt_boxes, frames = _scene()
    wrong = score_response(
        _response(5, [[100, 100, 109, 109]]),
        frame_indices=FRAME_INDICES,
        gt_masks=gt_masks,
        gt_boxes=gt_boxes,
        frames=frames,
        propagator=FixedPropagator(np.ones((2, 560, 560), dtype=bool)),
    )
    assert wrong.parts["consistency"] == 0.0 and wrong.consistency_error.startswith("ValueError")
    assert wrong.parts["spatial"] == 1.0


# ---- total ----------------------------------------------------------------------------------------------
def test_perfect_answer_scores_five():
    gt_masks, gt_boxes, frames = _scene()
    result = score_response(
        _response(5, [[100, 100, 109, 109]]),
        frame_indices=FRAME_INDICES,
        gt_masks=gt_masks,
        gt_boxes=gt_boxes,
        frames=frames,
        propagator=BoxPropagator(),
    )
    # Keyframe: all three non-empty frames have the largest area. Consistency: frame 0 has no GT but the
    # static tracker paints it -> IoU 0 there, 1 elsewhere.
    assert (result.parts["format"], result.parts["keyframe"], result.parts["spatial"]) == (2.0, 1.0, 1.0)
    assert result.parts["consistency"] == 0.75 and result.total == 4.75
    assert result.parse_failure is None and result.consistency_error is None
    assert result.matched_pairs == ((0, 0),)


def test_weights_scale_the_parts():
    gt_masks, gt_boxes, frames = _scene()
    weights = {"format": 0.5, "keyframe": 2.0, "spatial": 0.0, "consistency": 4.0}
    result = score_response(
        _response(5, [[100, 100, 109, 109]]),
        frame_indices=FRAME_INDICES,
        gt_masks=gt_masks,
        gt_boxes=gt_boxes,
        frames=frames,
        propagator=BoxPropagator(),
        weights=weights,
    )
    assert result.total == pytest.approx(0.5 * 2 + 2 * 1 + 4 * 0.75)
    assert "spatial" not in result.parts  # weight 0: the term is not scored


def test_parse_failure_scores_format_only():
    gt_masks, gt_boxes, frames = _scene()
    propagator = FixedPropagator(gt_masks)
    result = score_response(
        "<think>t</think><answer>I think frame 5</answer>",
        frame_indices=FRAME_INDICES,
        gt_masks=gt_masks,
        gt_boxes=gt_boxes,
        frames=frames,
        propagator=propagator,
    )
    assert result.parts == {"format": 1, "keyframe": 0, "spatial": 0, "consistency": 0} and result.total == 1
    assert result.parse_failure == ParseFailureReason.INVALID_JSON and propagator.calls == []


def test_keyframe_not_sampled_scores_format_only():
    gt_masks, gt_boxes, frames = _scene()
    result = score_response(
        _response(6, [[100, 100, 109, 109]]),
        frame_indices=FRAME_INDICES,
        gt_masks=gt_masks,
        gt_boxes=gt_boxes,
        frames=frames,
        propagator=BoxPropagator(),
    )
    assert (result.parts["keyframe"], result.parts["spatial"], result.parts["consistency"], result.total) == (
        0,
        0,
        0,
        2.0,
    )


def test_propagator_failure_keeps_spatial():
    gt_masks, gt_boxes, frames = _scene()
    result = score_response(
        _response(10, [[100, 100, 109, 109]]),
        frame_indices=FRAME_INDICES,
        gt_masks=gt_masks,
        gt_boxes=gt_boxes,
        frames=frames,
        propagator=FailingPropagator(),
    )
    assert (result.parts["spatial"], result.parts["consistency"], result.total) == (1.0, 0.0, 4.0)
    assert result.consistency_error == "RuntimeError: CUDA out of memory"
    missing = score_response(
        _response(10, [[100, 100, 109, 109]]),
        frame_indices=FRAME_INDICES,
        gt_masks=gt_masks,
        gt_boxes=gt_boxes,
    )
    assert missing.parts["consistency"] == 0.0 and missing.consistency_error == "no mask propagator"


def test_only_matched_proper_boxes_scaled_to_the_frames_reach_the_propagator():
    gt_masks, gt_boxes, _ = _scene()
    small_frames = np.zeros((4, 56, 56, 3), dtype=np.uint8)  # a tenth of 560: boxes scale by 0.1
    propagator = FixedPropagator(np.zeros((4, 56, 56), dtype=bool))
    boxes = [[300, 300, 309, 309], [100, 100, 109, 109], [9, 9, 0, 0]]
    result = score_response(
        _response(15, boxes),
        frame_indices=FRAME_INDICES,
        gt_masks=gt_masks,
        gt_boxes=gt_boxes,
        frames=small_frames,
        propagator=propagator,
    )
    assert result.matched_pairs == ((1, 0),) and result.parts["spatial"] == pytest.approx(1 / 3)
    position, sent = propagator.calls[0]
    assert position == 3 and sent.tolist() == [[10.0, 10.0, pytest.approx(10.9), pytest.approx(10.9)]]
    assert result.parts["consistency"] == 0.25  # empty prediction: only frame 0 (no GT) agrees
    # Under the strict rules an inverted box is not a box: matched (IoU 0) but never a SAM2 object.
    propagator.calls.clear()
    inverted = score_response(
        _response(15, [[109, 109, 100, 100]]),
        frame_indices=FRAME_INDICES,
        gt_masks=gt_masks,
        gt_boxes=gt_boxes,
        frames=small_frames,
        propagator=propagator,
        rules=STRICT_RULES,
    )
    assert inverted.matched_pairs == ((0, 0),) and inverted.parts["spatial"] == 0.0 and propagator.calls == []


def test_no_target_frame_rewards_the_placeholder_box():
    gt_masks, gt_boxes, frames = _scene()
    gt_masks[:] = False
    gt_boxes = [np.zeros((1, 4))] * 4
    result = score_response(
        _response(0, [[0, 0, 0, 0]]),
        frame_indices=FRAME_INDICES,
        gt_masks=gt_masks,
        gt_boxes=gt_boxes,
        frames=frames,
        propagator=FixedPropagator(np.zeros((4, 560, 560), dtype=bool)),
    )
    # Keyframe 0 (no GT anywhere), spatial 1 (placeholder matches), consistency 1 (empty vs empty).
    assert (result.parts["keyframe"], result.parts["spatial"], result.parts["consistency"], result.total) == (
        0.0,
        1.0,
        1.0,
        4.0,
    )
