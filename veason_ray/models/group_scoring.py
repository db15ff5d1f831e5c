"""The full reward of many GRPO groups at once, with one shared propagation pass.

`score_groups` gives every rollout exactly `rewards.score_response` (format, keyframe, spatial, consistency);
only the order of work changes. Pass 1 runs `score_response` with a propagator that records what it is asked
to propagate (and stops there); all recorded requests then go to the mask propagator's `propagate_many` in one
call (with `SAM2GroupPropagator`: each video encoded once, identical objects tracked once, objects batched;
other propagators answer request by request); pass 2 runs `score_response` again with a propagator that
answers from those results. So the reward logic exists once, in rewards.py.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from veason_ray.config import RewardWeights
from veason_ray.mask_propagation import MaskPropagator, PropagationRequest
from veason_ray.records import PromptGroup, Rollout, Scored
from veason_ray.rewards import RewardBreakdown, score_response

log = logging.getLogger(__name__)


@dataclass
class GroupInput:
    """One group to score: its prompt group, its rollouts, and its frames resolved to an array."""

    group: PromptGroup
    rollouts: Sequence[Rollout]
    frames: np.ndarray


class _Deferred(Exception):
    """Raised by the recording propagator: the request is kept, the answer comes in pass 2."""


class _RecordingPropagator(MaskPropagator):
    def __init__(self, video: int):
        self.video = video
        self.requests: list[PropagationRequest] = []

    def propagate(self, frames: np.ndarray, keyframe_position: int, boxes: np.ndarray) -> np.ndarray:
        self.requests.append(
            PropagationRequest(self.video, int(keyframe_position), np.array(boxes, np.float32))
        )
        raise _Deferred


class _AnsweringPropagator(MaskPropagator):
    def __init__(self, answer: np.ndarray | Exception):
        self.answer = answer

    def propagate(self, frames: np.ndarray, keyframe_position: int, boxes: np.ndarray) -> np.ndarray:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def _propagate_all(
    propagator: MaskPropagator, videos: dict[int, np.ndarray], requests: list[PropagationRequest]
) -> list[np.ndarray | Exception]:
    """All requests in one call; if that call fails, each request alone, so one bad request costs only its
    own consistency part."""
    try:
        return list(propagator.propagate_many(videos, requests))
    except Exception as error:  # noqa: BLE001 - any propagator failure is isolated below, never raised
        log.warning(
            "batched mask propagation failed (%s: %s); propagating one request at a time",
            type(error).__name__,
            error,
        )
    answers: list[np.ndarray | Exception] = []
    for request in requests:
        try:
            answers.append(propagator.propagate_many(videos, [request])[0])
        except Exception as error:  # noqa: BLE001
            answers.append(error)
    return answers


def _score(item: GroupInput, rollout: Rollout, propagator: MaskPropagator | None, weights: RewardWeights):
    sample = item.group.sample
    return score_response(
        rollout.text,
        frame_indices=sample.frame_indices,
        gt_masks=sample.gt_masks_560,
        gt_boxes=sample.gt_boxes_560,
        frames=item.frames,
        propagator=propagator,
        weights=weights,
    )


def score_groups(
    items: Sequence[GroupInput], propagator: MaskPropagator, weights: RewardWeights | None = None
) -> list[list[Scored]]:
    """`Scored` for every rollout of every group (same order), each reward equal to `score_response` with
    `propagator` (for `SAM2GroupPropagator`: with a plain SAM2 propagator on the same model); the propagation
    requests of all groups go to `propagator.propagate_many` in one call."""
    weights = weights or RewardWeights()
    first: list[list[RewardBreakdown]] = []
    pending: list[tuple[int, int, int]] = []  # (group, rollout, request index)
    requests: list[PropagationRequest] = []
    for g, item in enumerate(items):
        row = []
        for r, rollout in enumerate(item.rollouts):
            recorder = _RecordingPropagator(g)
            row.append(_score(item, rollout, recorder, weights))
            if recorder.requests:
                pending.append((g, r, len(requests)))
                requests.extend(recorder.requests)
        first.append(row)
    videos = {g: items[g].frames for g in {g for g, _, _ in pending}}
    answers = _propagate_all(propagator, videos, requests) if requests else []
    for g, r, index in pending:
        first[g][r] = _score(items[g], items[g].rollouts[r], _AnsweringPropagator(answers[index]), weights)
    return [
        [Scored(rollout, reward) for rollout, reward in zip(item.rollouts, row, strict=True)]
        for item, row in zip(items, first, strict=True)
    ]
