"""The GRPO reward of docs/method.md section 4 as a registry of terms: each term is a function and a weight.

The paper's four terms: format (in [0, 2]), keyframe, spatial and consistency (each in [0, 1]), all weighted 1.
Two optional terms from ReVSeg (arXiv 2512.02835, which rewards boxes only, with no SAM2 in the loop), weighted 0
unless `reward.weights` names them: `box_hit` (share of Hungarian-matched boxes with IoU > 0.5) and `box_area`
(the chosen frame's GT box area over the largest among the sampled frames). A term with weight 0 is not scored
at all, so `reward.weights.consistency=0` runs no mask propagator. A new term is one `register_term` call;
metrics and summaries list whatever terms are scored. How an answer goes through the terms (and the two passes
around the mask propagator) is in reward_scoring.py; docs/method.md gives every convention.

Conventions: boxes are in 560x560 pixels; gt_masks are the GT union masks at the sampled frames (T, H, W),
normally at 560x560 (nearest); frame_indices are the sampled frames' indices in the video (the prompt's
timestamps). Nothing here raises on any model output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from veason_ray.answer_parsing import MAX_BOXES, ParsedAnswer, ParseFailure, parse_answer
from veason_ray.boxes import FRAME_SIZE, box_iou_matrix, clip_boxes_560, resize_masks_nearest, scale_boxes
from veason_ray.metrics import jaccard_per_frame
from veason_ray.reward_rules import RewardRules

BOX_HIT_IOU = 0.5  # ReVSeg's spatial reward: a box counts when its IoU passes 0.5


@dataclass(frozen=True)
class SpatialMatch:
    """Spatial reward, the Hungarian pairs (predicted box index, GT box index) as (P, 2) int64, their IoUs (P,)
    and the number of predictions counted (the denominator's predicted side)."""

    reward: float
    pairs: np.ndarray
    ious: np.ndarray
    predictions: int


def format_reward(answer: str | ParsedAnswer | ParseFailure) -> float:
    """In [0, 2]: 1 if the whole response matches the tag regex, plus the answer part (well-formed box entries
    / number of entries, 1 if the list is empty, when the answer's JSON has a keyframe and a box list)."""
    parsed = parse_answer(answer) if isinstance(answer, str) else answer
    return (1.0 if parsed.format_match else 0.0) + parsed.answer_format


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
    pred_boxes: np.ndarray, gt_boxes: np.ndarray, num_predictions: int | None = None, clip: bool = True
) -> SpatialMatch | None:
    """In [0, 1]: sum of Hungarian-matched IoUs (+1 pixel convention, cost 1 - IoU) / max(#pred, #gt).

    pred_boxes: (M, 4) valid predicted boxes; num_predictions: how many predictions the answer made (entries
    that were not valid boxes count as predictions that match nothing; default M). At most MAX_BOXES of either
    side are considered. gt_boxes: (N, 4) of the keyframe (see boxes.ground_truth_boxes_560). clip: predicted
    boxes clipped to the frame first (`RewardRules.clip_boxes`). None when the IoUs cannot be matched (a NaN,
    which only unclipped raw coordinates can give): the release then scores neither spatial nor consistency."""
    pred = np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 4)[:MAX_BOXES]
    gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)[:MAX_BOXES]
    predictions = min(max(num_predictions if num_predictions is not None else 0, len(pred)), MAX_BOXES)
    if len(pred) == 0 or len(gt) == 0:
        return SpatialMatch(0.0, np.zeros((0, 2), dtype=np.int64), np.zeros(0), predictions)
    iou = box_iou_matrix(pred, gt, clip=clip)
    try:
        rows, cols = linear_sum_assignment(1.0 - iou)
    except ValueError:  # NaN or -inf costs
        return None
    matched = iou[rows, cols]
    reward = float(matched.sum()) / max(predictions, len(gt))
    return SpatialMatch(reward, np.stack([rows, cols], axis=1).astype(np.int64), matched, predictions)


def box_hit_reward(match: SpatialMatch, num_gt: int) -> float:
    """In [0, 1]: matched pairs with IoU > 0.5 / max(#pred, #gt) (ReVSeg's binary box reward, generalised to
    several boxes by the same Hungarian match as the spatial reward)."""
    denominator = max(match.predictions, min(num_gt, MAX_BOXES))
    return float(np.count_nonzero(match.ious > BOX_HIT_IOU)) / denominator if denominator else 0.0


def box_area_reward(keyframe: int, frame_indices: Sequence[int], gt_boxes: Sequence[np.ndarray]) -> float:
    """In [0, 1]: the summed area of the GT boxes on the chosen frame / the largest such sum over the sampled
    frames (ReVSeg's temporal reward: a frame where the target is large); 0 when the keyframe is not sampled or
    no sampled frame has a GT box. Areas are (x2 - x1) * (y2 - y1) in 560 space; absent objects are 0."""
    indices = [int(i) for i in frame_indices]
    if keyframe not in indices:
        return 0.0
    areas = [
        float(np.sum(np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)))
        for b in (np.asarray(boxes, dtype=np.float64).reshape(-1, 4) for boxes in gt_boxes)
    ]
    largest = max(areas, default=0.0)
    return areas[indices.index(keyframe)] / largest if largest > 0 else 0.0


def mask_consistency(pred_masks: np.ndarray, gt_masks: np.ndarray) -> float:
    """In [0, 1]: mean over the sampled frames of IoU(predicted mask, GT union), 1 where both are empty.
    pred_masks (T, h, w) are brought to the GT's (H, W) by nearest neighbour when sizes differ."""
    pred, gt = np.asarray(pred_masks), np.asarray(gt_masks)
    if pred.ndim != 3 or len(pred) != len(gt):
        raise ValueError(f"propagated masks have shape {pred.shape}, expected ({len(gt)}, H, W)")
    if pred.shape[1:] != gt.shape[1:]:
        pred = resize_masks_nearest(pred, gt.shape[1:])
    return float(jaccard_per_frame(pred, gt).mean())


def propagation_boxes(matched_560: np.ndarray, frame_size: tuple[int, int], clip: bool = True) -> np.ndarray:
    """The matched predicted boxes (560 space) as mask-propagator objects in the pixels of (height, width)
    frames. clip (`RewardRules.clip_boxes`): clipped to the frame, and boxes with x2 < x1 or y2 < y1 (IoU 0)
    dropped; else every matched box as given."""
    boxes = np.asarray(matched_560, dtype=np.float64).reshape(-1, 4)
    if clip:
        boxes = clip_boxes_560(boxes)
        boxes = boxes[(boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])]
    height, width = frame_size
    return scale_boxes(boxes, (FRAME_SIZE, FRAME_SIZE), (width, height))


@dataclass
class AnswerScoring:
    """What the terms read: the parsed answer and the ground truth at the sampled frames, the keyframe's
    position among them and the keyframe's box match (each worked out once), and, for the terms that need
    them, the predicted masks at the sampled frames (set between the two passes; None when not propagated)."""

    parsed: ParsedAnswer | ParseFailure
    rules: RewardRules
    frame_indices: list[int]
    gt_masks: np.ndarray
    gt_boxes: Sequence[np.ndarray]
    position: int | None = None
    match: SpatialMatch | None = None
    masks: np.ndarray | None = None

    @property
    def answered(self) -> ParsedAnswer | None:
        return self.parsed if isinstance(self.parsed, ParsedAnswer) else None


@dataclass(frozen=True)
class RewardTerm:
    """One reward term: `score` reads an AnswerScoring and returns a float within `bounds`; `needs_masks`
    terms are scored after the mask propagator ran (and make it run); `default_weight` applies unless
    `reward.weights` names the term."""

    name: str
    score: Callable[[AnswerScoring], float]
    default_weight: float = 1.0
    needs_masks: bool = False
    bounds: tuple[float, float] = (0.0, 1.0)


REWARD_TERMS: dict[str, RewardTerm] = {}  # registration order is the order of metrics and tables


def register_term(term: RewardTerm) -> RewardTerm:
    if term.name in REWARD_TERMS or term.name == "total":
        raise ValueError(f"a reward term called {term.name!r} exists already")
    REWARD_TERMS[term.name] = term
    return term


def reward_weights(configured: Mapping[str, float] | None = None) -> dict[str, float]:
    """Every registered term's weight: `configured` (reward.weights) where it names the term, else the term's
    default. Raises ValueError naming an unknown term or a negative weight."""
    configured = dict(configured or {})
    for name, weight in configured.items():
        if name not in REWARD_TERMS:
            raise ValueError(
                f"reward.weights.{name}: no reward term is called {name!r}; the terms are "
                f"{', '.join(REWARD_TERMS)}"
            )
        if not weight >= 0:
            raise ValueError(
                f"reward.weights.{name}={weight}: a weight must be >= 0 (0 switches the term off)"
            )
    return {name: float(configured.get(name, term.default_weight)) for name, term in REWARD_TERMS.items()}


def scored_terms(weights: Mapping[str, float]) -> list[RewardTerm]:
    """The terms that are scored: those with a weight above 0, in registration order."""
    return [term for name, term in REWARD_TERMS.items() if weights.get(name, 0.0) > 0]


def ordered_parts(names: Iterable[str]) -> tuple[str, ...]:
    """Reward part names as tables show them: the registered terms among `names` in registration order, any
    other name after them, "total" last (each once)."""
    present = set(names)
    known = [name for name in REWARD_TERMS if name in present]
    others = sorted(present - set(REWARD_TERMS) - {"total"})
    return (*known, *others, *(("total",) if "total" in present else ()))


def needs_masks(weights: Mapping[str, float] | None) -> bool:
    """Whether any scored term needs propagated masks (else no mask propagator need exist)."""
    return any(term.needs_masks for term in scored_terms(reward_weights(weights)))


def _keyframe_term(s: AnswerScoring) -> float:
    return keyframe_reward(s.answered.keyframe, s.frame_indices, s.gt_masks) if s.answered else 0.0


def _spatial_term(s: AnswerScoring) -> float:
    return s.match.reward if s.match is not None else 0.0


def _consistency_term(s: AnswerScoring) -> float:
    return mask_consistency(s.masks, s.gt_masks) if s.masks is not None else 0.0


def _box_hit_term(s: AnswerScoring) -> float:
    if s.match is None or s.position is None:
        return 0.0
    return box_hit_reward(s.match, len(np.asarray(s.gt_boxes[s.position]).reshape(-1, 4)))


def _box_area_term(s: AnswerScoring) -> float:
    return box_area_reward(s.answered.keyframe, s.frame_indices, s.gt_boxes) if s.answered else 0.0


register_term(RewardTerm("format", lambda s: format_reward(s.parsed), bounds=(0.0, 2.0)))
register_term(RewardTerm("keyframe", _keyframe_term))
register_term(RewardTerm("spatial", _spatial_term))
register_term(RewardTerm("consistency", _consistency_term, needs_masks=True))
register_term(RewardTerm("box_hit", _box_hit_term, default_weight=0.0))
register_term(RewardTerm("box_area", _box_area_term, default_weight=0.0))
