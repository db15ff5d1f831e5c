"""Synthetic GRPO reward inputs (and a comparison of rewards) for the SAM2 reward's tests and its benchmark
(benchmarks/reward.py): one group = a clip of moving discs at 560x560 with its ground truth, plus n answers of
the kind a policy gives (keyframes among the largest-mask frames, jittered boxes, now and then an extra or a
missing box).

With `edge_cases`, a group also holds an answer that does not parse, one whose keyframe is not a sampled
frame, one without boxes, and one that repeats an earlier answer word for word.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from veason_ray.boxes import ground_truth_boxes_560
from veason_ray.prompts import render_answer
from veason_ray.records import ExpressionRecord, PromptGroup, Rollout, Sample
from veason_ray.reward_scoring import RewardBreakdown

SIZE = 560


def _clip(rng: np.random.Generator, num_frames: int, num_objects: int) -> tuple[np.ndarray, np.ndarray]:
    """(T, 560, 560, 3) uint8 frames and (K, T, 560, 560) bool per-object masks of discs moving in lines."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    base = rng.integers(0, 60, (1, SIZE // 8, SIZE // 8, 3), dtype=np.uint8)
    frames = np.repeat(np.repeat(np.repeat(base, num_frames, 0), 8, 1), 8, 2)
    masks = np.zeros((num_objects, num_frames, SIZE, SIZE), dtype=bool)
    for k in range(num_objects):
        start = rng.uniform(100, 460, 2)
        step = rng.uniform(-40, 40, 2)
        radius = rng.uniform(30, 80)
        color = rng.integers(120, 256, 3, dtype=np.uint8)
        for t in range(num_frames):
            cx, cy = start + step * t
            disc = (xx - cx) ** 2 + (yy - cy) ** 2 < radius**2
            masks[k, t] = disc
            frames[t][disc] = color
    return frames, masks


def _answers(
    rng: np.random.Generator,
    frame_indices: tuple[int, ...],
    gt_masks: np.ndarray,
    gt_boxes: list,
    n: int,
    edge: bool,
) -> list[str]:
    top = np.argsort(-gt_masks.reshape(len(gt_masks), -1).sum(1), kind="stable")[:3]
    texts = []
    for i in range(n):
        position = int(rng.choice(top))
        boxes = gt_boxes[position] + rng.normal(0, 12, gt_boxes[position].shape)
        if rng.random() < 0.15:
            boxes = np.concatenate([boxes, boxes[:1] + rng.normal(0, 40, (1, 4))])
        elif len(boxes) > 1 and rng.random() < 0.3:
            boxes = boxes[:1]
        texts.append(render_answer(f"answer {i}", frame_indices[position], np.clip(boxes, 0, SIZE - 1)))
    if edge and n >= 5:
        texts[1] = "I think it is the disc."  # does not parse
        texts[2] = render_answer("off", frame_indices[0] + 1, gt_boxes[0])  # keyframe not sampled
        texts[3] = render_answer("none", frame_indices[0], np.zeros((0, 4)))  # no boxes
        texts[4] = texts[0]  # a repeated answer
    return texts


def synthetic_group(
    group_id: int,
    *,
    seed: int,
    num_frames: int = 6,
    num_objects: int = 1,
    answers: int = 8,
    frame_stride: int = 3,
    edge_cases: bool = True,
) -> tuple[PromptGroup, list[Rollout]]:
    """One prompt group (frames as an array) and its `answers` rollouts; deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    frames, object_masks = _clip(rng, num_frames, num_objects)
    gt_masks = object_masks.any(axis=0)
    gt_boxes = [ground_truth_boxes_560(object_masks[:, t]) for t in range(num_frames)]
    frame_indices = tuple(range(0, num_frames * frame_stride, frame_stride))
    objects = tuple(range(1, num_objects + 1))
    record = ExpressionRecord(
        dataset="synthetic",
        split="train",
        video=f"clip{seed}",
        exp_id=str(group_id),
        expression="the moving disc",
        type_id=0,
        obj_ids=objects,
        anno_ids=tuple(map(str, objects)),
    )
    sample = Sample(
        record=record,
        frame_indices=frame_indices,
        keyframe=None,
        frames=frames,
        gt_masks_560=gt_masks,
        gt_boxes_560=gt_boxes,
        original_size=(SIZE, SIZE),
        num_video_frames=frame_indices[-1] + 1,
    )
    texts = _answers(rng, frame_indices, gt_masks, gt_boxes, answers, edge_cases)
    rollouts = [Rollout(group_id, i, text, [], [], "stop", 0) for i, text in enumerate(texts)]
    return PromptGroup(group_id, sample), rollouts


def max_reward_difference(got: Sequence[RewardBreakdown], want: Sequence[RewardBreakdown]) -> float:
    """Largest |difference| of any reward part (total included) between two lists of breakdowns; inf when
    their lengths, parse failures, consistency errors or matched pairs differ."""
    if len(got) != len(want):
        return math.inf
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        if (a.parse_failure, a.consistency_error, a.matched_pairs) != (
            b.parse_failure,
            b.consistency_error,
            b.matched_pairs,
        ):
            return math.inf
        if a.parts.keys() != b.parts.keys():
            return math.inf
        for part in a.parts:
            worst = max(worst, abs(a.parts[part] - b.parts[part]))
        worst = max(worst, abs(a.total - b.total))
    return worst
