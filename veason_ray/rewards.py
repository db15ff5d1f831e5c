"""The GRPO reward of method.md section 4: format + keyframe + spatial + consistency, total in [0, 5] with the
default weights. Pure functions on plain arrays; the mask propagator (SAM2) comes in through its interface.

Conventions: boxes are in 560x560 pixels; gt_masks are the GT union masks at the sampled frames (T, H, W),
normally at 560x560 (nearest); frame_indices are the sampled frames' indices in the video (the prompt's
timestamps). A malformed answer scores its format part only; a failing propagator costs the consistency part
only; nothing here raises on any model output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from veason_ray.answer_parsing import MAX_BOXES, ParsedAnswer, ParseFailure, ParseFailureReason, parse_answer
from veason_ray.boxes import FRAME_SIZE, box_iou_matrix, clip_boxes_560, resize_masks_nearest, scale_boxes
from veason_ray.config import RewardWeights
from veason_ray.mask_propagation import MaskPropagator
from veason_ray.metrics import jaccard_per_frame


@dataclass(frozen=True)
class SpatialMatch:
    """Spatial reward and the Hungarian pairs (predicted box index, GT box index), (P, 2) int64."""

    reward: float
    pairs: np.ndarray


@dataclass(frozen=True)
class RewardBreakdown:
    """The reward parts of one response (unweighted) and the weighted total.

    parse_failure: why the answer did not parse (then only format is non-zero). consistency_error: why the
    consistency part is 0 without being measured (no propagator given, or it failed). matched_pairs: the
    spatial reward's (predicted box, GT box) pairs; the predicted ones are the SAM2 objects."""

    format: float
    keyframe: float
    spatial: float
    consistency: float
    total: float
    parse_failure: ParseFailureReason | None = None
    consistency_error: str | None = None
    matched_pairs: tuple[tuple[int, int], ...] = ()


def format_reward(answer: str | ParsedAnswer | ParseFailure) -> float:
    """In [0, 2]: 1 if the whole response matches the tag regex, plus valid box entries / number of entries
    (1 if the list is empty) when the answer parses."""
    parsed = parse_answer(answer) if isinstance(answer, str) else answer
    tags = 1.0 if parsed.format_match else 0.0
    if isinstance(parsed, ParseFailure):
        return tags
    return tags + parsed.valid_entries / max(parsed.box_entries, 1)


def _frame_areas(gt_masks: np.ndarray) -> np.ndarray:
    masks = np.asarray(gt_masks)
    return np.count_nonzero(masks.reshape(masks.shape[0], -1), axis=1)


def keyframe_reward(keyframe: int, frame_indices: Sequence[int], gt_masks: np.ndarray) -> float:
    """In [0, 1]: GT area at the chosen frame / largest GT area over the sampled frames; 0 when the keyframe is
    not a sampled frame index or no sampled frame has any GT pixel. gt_masks: (T, H, W) at the sampled frames."""
    indices = [int(i) for i in frame_indices]
    if keyframe not in indices:
        return 0.0
    areas = _frame_areas(gt_masks)
    largest = int(areas.max()) if areas.size else 0
    return 0.0 if largest == 0 else float(areas[indices.index(keyframe)]) / largest


def spatial_reward(
    pred_boxes: np.ndarray, gt_boxes: np.ndarray, num_predictions: int | None = None
) -> SpatialMatch:
    """In [0, 1]: sum of Hungarian-matched IoUs (+1 pixel convention, cost 1 - IoU) / max(#pred, #gt).

    pred_boxes: (M, 4) valid predicted boxes; num_predictions: how many predictions the answer made (entries
    that were not valid boxes count as predictions that match nothing; default M). At most MAX_BOXES of either
    side are considered. gt_boxes: (N, 4) of the keyframe (see boxes.ground_truth_boxes_560)."""
    pred = np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 4)[:MAX_BOXES]
    gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)[:MAX_BOXES]
    predictions = min(max(num_predictions if num_predictions is not None else 0, len(pred)), MAX_BOXES)
    if len(pred) == 0 or len(gt) == 0:
        return SpatialMatch(0.0, np.zeros((0, 2), dtype=np.int64))
    iou = box_iou_matrix(pred, gt)
    rows, cols = linear_sum_assignment(1.0 - iou)
    reward = float(iou[rows, cols].sum()) / max(predictions, len(gt))
    return SpatialMatch(reward, np.stack([rows, cols], axis=1).astype(np.int64))


def consistency_reward(
    propagator: MaskPropagator,
    frames: np.ndarray,
    keyframe_position: int,
    boxes: np.ndarray,
    gt_masks: np.ndarray,
) -> float:
    """In [0, 1]: mean over the sampled frames of IoU(propagated mask, GT union), 1 where both are empty.

    frames: (T, H, W, 3) uint8; boxes: (K, 4) in the pixels of `frames`, one SAM2 object each (K == 0: empty
    masks, the propagator is not called); gt_masks: (T, h, w), the propagated masks are brought to (h, w) by
    nearest neighbour when sizes differ. Raises ValueError when the propagator returns a wrong shape."""
    count, height, width = frames.shape[:3]
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if len(boxes) == 0:
        pred = np.zeros((count, height, width), dtype=bool)
    else:
        pred = np.asarray(propagator.propagate(frames, keyframe_position, boxes))
    if pred.shape != (count, height, width):
        raise ValueError(f"propagator returned shape {pred.shape}, expected {(count, height, width)}")
    gt = np.asarray(gt_masks)
    if pred.shape[1:] != gt.shape[1:]:
        pred = resize_masks_nearest(pred, gt.shape[1:])
    return float(jaccard_per_frame(pred, gt).mean())


def _propagation_boxes(pred_boxes: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """Matched predicted boxes, clipped to the frame and scaled to the frames' pixels; boxes with x2 < x1 or
    y2 < y1 are not boxes (IoU 0) and become no SAM2 object."""
    clipped = clip_boxes_560(pred_boxes)
    proper = (clipped[:, 2] >= clipped[:, 0]) & (clipped[:, 3] >= clipped[:, 1])
    height, width = frames.shape[1:3]
    return scale_boxes(clipped[proper], (FRAME_SIZE, FRAME_SIZE), (width, height))


def _consistency(
    propagator: MaskPropagator | None,
    frames: np.ndarray | None,
    position: int,
    boxes: np.ndarray,
    gt_masks: np.ndarray,
) -> tuple[float, str | None]:
    if propagator is None or frames is None:
        return 0.0, "no mask propagator"
    try:
        frames = np.asarray(frames)
        boxes = _propagation_boxes(boxes, frames)
        return consistency_reward(propagator, frames, position, boxes, gt_masks), None
    except Exception as error:  # a failing SAM2 costs the consistency part, never the step
        return 0.0, f"{type(error).__name__}: {error}"


def score_response(
    response: object,
    *,
    frame_indices: Sequence[int],
    gt_masks: np.ndarray,
    gt_boxes: Sequence[np.ndarray],
    frames: np.ndarray | None = None,
    propagator: MaskPropagator | None = None,
    weights: RewardWeights | None = None,
) -> RewardBreakdown:
    """All reward parts of one response and their weighted total.

    frame_indices: (T,) sampled frame indices; gt_masks: (T, H, W) GT union masks at them; gt_boxes: per sampled
    frame, its (N, 4) GT boxes in 560 space; frames: (T, h, w, 3) uint8 sampled frames for the propagator (any
    size: boxes are scaled from 560 space to it). Without a propagator or frames consistency is 0.
    """
    weights = weights or RewardWeights()
    parsed = parse_answer(response)
    fmt = format_reward(parsed)
    if isinstance(parsed, ParseFailure):
        return RewardBreakdown(fmt, 0.0, 0.0, 0.0, weights.format * fmt, parse_failure=parsed.reason)
    keyframe = keyframe_reward(parsed.keyframe, frame_indices, gt_masks)
    indices = [int(i) for i in frame_indices]
    spatial, consistency, error, pairs = 0.0, 0.0, None, ()
    if parsed.keyframe in indices:
        position = indices.index(parsed.keyframe)
        match = spatial_reward(parsed.boxes, gt_boxes[position], parsed.considered_entries)
        spatial, pairs = match.reward, tuple((int(p), int(g)) for p, g in match.pairs)
        matched = parsed.boxes[match.pairs[:, 0]]
        consistency, error = _consistency(propagator, frames, position, matched, gt_masks)
    total = (
        weights.format * fmt
        + weights.keyframe * keyframe
        + weights.spatial * spatial
        + weights.consistency * consistency
    )
    return RewardBreakdown(fmt, keyframe, spatial, consistency, total, None, error, pairs)
