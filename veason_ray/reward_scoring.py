"""Scoring one answer with the registered reward terms (rewards.py), in two explicit passes around the masks.

`begin_scoring` parses the answer under the reward rules, matches its boxes on the keyframe and scores every
term that needs no masks; it says which boxes the mask propagator must track (`PendingScore.mask_boxes`).
`finish_scoring` takes the propagated masks (or the propagator's error, or None when there is no propagator)
and scores the mask terms. `score_response` runs both around one propagator call; the reward pool
(`models/group_scoring.py`) runs pass 1 for many answers, propagates all their boxes in one batched call, then
runs pass 2. A malformed answer scores what the rules give it; a failing propagator costs the mask terms only
(`consistency_error` says why); nothing here raises on any model output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from veason_ray.answer_parsing import ParsedAnswer, ParseFailureReason, parse_answer
from veason_ray.mask_propagation import MaskPropagator
from veason_ray.reward_rules import RELEASE_RULES, RewardRules
from veason_ray.rewards import AnswerScoring, propagation_boxes, reward_weights, scored_terms, spatial_reward


@dataclass(frozen=True)
class RewardTargets:
    """The ground truth an answer is scored against: frame_indices (T,) of the sampled frames, gt_masks
    (T, H, W) their GT union masks (560x560), gt_boxes per sampled frame its (N, 4) GT boxes in 560 space."""

    frame_indices: Sequence[int]
    gt_masks: np.ndarray
    gt_boxes: Sequence[np.ndarray]

    @classmethod
    def of_sample(cls, sample: Any) -> RewardTargets:
        """The targets of a `records.Sample` (its 560-space ground truth at its sampled frames)."""
        return cls(sample.frame_indices, sample.gt_masks_560, sample.gt_boxes_560)


@dataclass(frozen=True)
class RewardBreakdown:
    """The scored terms of one response (unweighted, by name) and the weighted total.

    parse_failure: why the answer did not parse (the content terms are then 0). consistency_error: why the
    mask terms are 0 without being measured (no propagator, or it failed). matched_pairs: the spatial match's
    (predicted box, GT box) pairs; the predicted ones are the mask propagator's objects."""

    parts: dict[str, float]
    total: float
    parse_failure: ParseFailureReason | None = None
    consistency_error: str | None = None
    matched_pairs: tuple[tuple[int, int], ...] = ()


@dataclass
class PendingScore:
    """Pass 1's result: the scoring context, the weights, the terms scored so far, and `mask_boxes`: the
    (K, 4) boxes (pixels of the frames) to propagate from `keyframe_position`, (0, 4) for empty masks, or None
    when the mask terms are off or the rules give them 0 without masks."""

    scoring: AnswerScoring
    weights: dict[str, float]
    parts: dict[str, float] = field(default_factory=dict)
    mask_boxes: np.ndarray | None = None

    @property
    def keyframe_position(self) -> int:
        return int(self.scoring.position or 0)

    @property
    def needs_propagation(self) -> bool:
        return self.mask_boxes is not None and len(self.mask_boxes) > 0


def begin_scoring(
    response: object,
    targets: RewardTargets,
    frame_size: tuple[int, int] | None = None,
    rules: RewardRules = RELEASE_RULES,
    weights: Mapping[str, float] | None = None,
) -> PendingScore:
    """Pass 1. frame_size: (height, width) of the frames the mask propagator will track (the boxes are scaled
    from 560 space to them); None: the GT masks' size."""
    weights = reward_weights(weights)
    parsed = parse_answer(response, rules)
    indices = [int(i) for i in targets.frame_indices]
    scoring = AnswerScoring(parsed, rules, indices, np.asarray(targets.gt_masks), targets.gt_boxes)
    if isinstance(parsed, ParsedAnswer) and parsed.keyframe in indices:
        scoring.position = indices.index(parsed.keyframe)
        if parsed.boxes_scored:
            scoring.match = spatial_reward(
                parsed.boxes, targets.gt_boxes[scoring.position], parsed.considered_entries, rules.clip_boxes
            )
    pending = PendingScore(scoring, weights)
    terms = scored_terms(weights)
    pending.parts = {t.name: float(t.score(scoring)) for t in terms if not t.needs_masks}
    if any(t.needs_masks for t in terms) and scoring.match is not None:
        matched = parsed.boxes[scoring.match.pairs[:, 0]]
        size = frame_size or scoring.gt_masks.shape[1:3]
        with np.errstate(over="ignore"):  # unclipped (release) coordinates beyond float32 become infinite
            pending.mask_boxes = propagation_boxes(matched, size, rules.clip_boxes).astype(np.float32)
    return pending


def finish_scoring(pending: PendingScore, masks: np.ndarray | BaseException | None = None) -> RewardBreakdown:
    """Pass 2: score the mask terms with `masks` ((T, h, w) bool at the sampled frames, for the boxes of
    `pending.mask_boxes`), or with the propagator's error, or None (no propagator). Returns the breakdown."""
    scoring, parts = pending.scoring, dict(pending.parts)
    error = None
    mask_terms = [t for t in scored_terms(pending.weights) if t.needs_masks]
    if mask_terms:
        if pending.mask_boxes is not None and not pending.needs_propagation:
            scoring.masks = np.zeros(scoring.gt_masks.shape, dtype=bool)  # no objects: empty masks
        elif pending.needs_propagation:
            if isinstance(masks, BaseException):
                error = f"{type(masks).__name__}: {masks}"
            elif masks is None:
                error = "no mask propagator"
            else:
                scoring.masks = np.asarray(masks)
        for term in mask_terms:
            try:
                parts[term.name] = float(term.score(scoring)) if error is None else 0.0
            except Exception as failure:  # a wrong mask shape costs the mask terms, never the step
                error, parts[term.name] = f"{type(failure).__name__}: {failure}", 0.0
    if error is not None:
        parts.update({t.name: 0.0 for t in mask_terms})
    ordered = {t.name: parts[t.name] for t in scored_terms(pending.weights)}
    total = sum(pending.weights[name] * value for name, value in ordered.items())
    match = scoring.match
    return RewardBreakdown(
        parts=ordered,
        total=float(total),
        parse_failure=scoring.parsed.reason if not isinstance(scoring.parsed, ParsedAnswer) else None,
        consistency_error=error,
        matched_pairs=tuple((int(p), int(g)) for p, g in match.pairs) if match is not None else (),
    )


def score_response(
    response: object,
    *,
    frame_indices: Sequence[int],
    gt_masks: np.ndarray,
    gt_boxes: Sequence[np.ndarray],
    frames: np.ndarray | None = None,
    propagator: MaskPropagator | None = None,
    weights: Mapping[str, float] | None = None,
    rules: RewardRules = RELEASE_RULES,
) -> RewardBreakdown:
    """Every scored term of one response and their weighted total, with one propagator call.

    frames: (T, h, w, 3) uint8 sampled frames for the propagator (any size: boxes are scaled from 560 space to
    it). Without a propagator or frames the mask terms are 0 (`consistency_error` says so)."""
    targets = RewardTargets(frame_indices, gt_masks, gt_boxes)
    frames = None if frames is None else np.asarray(frames)
    pending = begin_scoring(
        response, targets, frames.shape[1:3] if frames is not None else None, rules, weights
    )
    if not pending.needs_propagation or propagator is None or frames is None:
        return finish_scoring(pending, None)
    try:
        masks: np.ndarray | BaseException = propagator.propagate(
            frames, pending.keyframe_position, pending.mask_boxes
        )
    except Exception as error:  # a failing propagator costs the mask terms, never the step
        masks = error
    return finish_scoring(pending, masks)


def score_sample(response: object, sample: Any, **kwargs: Any) -> RewardBreakdown:
    """`score_response` against a `records.Sample`'s ground truth (keyword arguments as there)."""
    targets = RewardTargets.of_sample(sample)
    return score_response(
        response,
        frame_indices=targets.frame_indices,
        gt_masks=targets.gt_masks,
        gt_boxes=targets.gt_boxes,
        **kwargs,
    )
