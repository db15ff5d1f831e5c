"""The full reward of many GRPO groups at once, with one shared propagation pass.

`score_groups` gives every rollout exactly `reward_scoring.score_response`; only the order of work changes.
Pass 1 (`begin_scoring`) scores every answer up to its masks and collects the boxes each needs propagated;
all those requests go to the mask propagator's `propagate_many` in one call (with `SAM2GroupPropagator`: each
video encoded once, identical objects tracked once, objects batched; other propagators answer request by
request); pass 2 (`finish_scoring`) scores the mask terms from the results. The reward logic exists once, in
rewards.py and reward_scoring.py. With no mask term scored (`reward.weights.consistency=0`) the propagator
is never called.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from veason_ray.mask_propagation import MaskPropagator, PropagationRequest
from veason_ray.records import PromptGroup, Rollout, Scored
from veason_ray.reward_rules import RELEASE_RULES, RewardRules
from veason_ray.reward_scoring import PendingScore, RewardTargets, begin_scoring, finish_scoring

log = logging.getLogger(__name__)


@dataclass
class GroupInput:
    """One group to score: its prompt group, its rollouts, and its frames resolved to an array."""

    group: PromptGroup
    rollouts: Sequence[Rollout]
    frames: np.ndarray


def _propagate_all(
    propagator: MaskPropagator, videos: dict[int, np.ndarray], requests: list[PropagationRequest]
) -> list[np.ndarray | Exception]:
    """All requests in one call; if that call fails, each request alone, so one bad request costs only its
    own mask terms."""
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


def score_groups(
    items: Sequence[GroupInput],
    propagator: MaskPropagator | None,
    weights: Mapping[str, float] | None = None,
    rules: RewardRules = RELEASE_RULES,
) -> list[list[Scored]]:
    """`Scored` for every rollout of every group (same order), each reward equal to `score_response` with
    `propagator` (for `SAM2GroupPropagator`: with a plain SAM2 propagator on the same model); the propagation
    requests of all groups go to `propagator.propagate_many` in one call. propagator None: the mask terms must
    be off (else they score 0, "no mask propagator")."""
    pending: list[list[PendingScore]] = []
    requests: list[PropagationRequest] = []
    asked: list[tuple[int, int]] = []  # (group, rollout) of each request
    for g, item in enumerate(items):
        targets = RewardTargets.of_sample(item.group.sample)
        row = [begin_scoring(r.text, targets, item.frames.shape[1:3], rules, weights) for r in item.rollouts]
        for r, score in enumerate(row):
            if score.needs_propagation:
                requests.append(PropagationRequest(g, score.keyframe_position, score.mask_boxes))
                asked.append((g, r))
        pending.append(row)
    masks: dict[tuple[int, int], np.ndarray | Exception] = {}
    if requests and propagator is not None:
        videos = {g: items[g].frames for g in {g for g, _ in asked}}
        masks = dict(zip(asked, _propagate_all(propagator, videos, requests), strict=True))
    return [
        [
            Scored(rollout, finish_scoring(score, masks.get((g, r))))
            for r, (rollout, score) in enumerate(zip(item.rollouts, pending[g], strict=True))
        ]
        for g, item in enumerate(items)
    ]
