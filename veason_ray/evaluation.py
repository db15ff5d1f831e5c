"""Scoring one expression (docs/method.md sections 4 and 7): an answer and the masks it led to, against the ground
truth. Pure: the answer and its masks come from inference (`veason_ray/inference.py`); evaluation is inference
followed by this. The evaluation job (pipelines/evaluate.py) calls it on its scorer actors.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import cv2
import numpy as np

from veason_ray.datasets import ExpressionRecord
from veason_ray.inference import LocatedAnswer
from veason_ray.metrics import ExpressionScore
from veason_ray.prompts import render_answer
from veason_ray.records import Sample
from veason_ray.reward_scoring import RewardBreakdown


def oracle_answer(sample: Sample, split_regions: bool = False) -> str:
    """The answer a perfect policy would give on a sample's frames: the sampled frame with the largest GT union
    mask (at 560) as the keyframe, and the GT boxes of the objects present on it. Scoring it checks the reward
    and segmentation path (and the mask propagator) independently of the policy; no-target expressions get no
    boxes. `split_regions`: one box per connected region of the keyframe's GT mask instead, for datasets that
    annotate several target objects as one mask (ReasonVOS), where the objects' own boxes are not known."""
    areas = sample.gt_masks_560.reshape(len(sample.frame_indices), -1).sum(axis=1)
    position = int(np.argmax(areas))
    boxes = sample.gt_boxes_560[position]
    present = boxes[np.any(boxes != 0, axis=1)] if areas[position] > 0 else np.zeros((0, 4))
    if split_regions and areas[position] > 0:
        present = region_boxes(sample.gt_masks_560[position])
    return render_answer("ground truth", sample.frame_indices[position], present)


def region_boxes(mask: np.ndarray) -> np.ndarray:
    """(K, 4) inclusive pixel boxes of the 8-connected regions of a (H, W) mask, largest first."""
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    regions = sorted(stats[1:count], key=lambda s: -int(s[cv2.CC_STAT_AREA]))
    return np.array([[x, y, x + w - 1, y + h - 1] for x, y, w, h, _ in regions], dtype=np.float64).reshape(
        -1, 4
    )


def reward_parts(reward: RewardBreakdown) -> dict[str, float]:
    """The scored terms of a reward and its total, by name."""
    return {**reward.parts, "total": float(reward.total)}


@dataclass
class ExpressionResult:
    """The outcome of one expression; one line of results.jsonl (`as_json` / `from_json`).

    j, f, r_*: means over every frame of the video, in [0, 1] (NaN for a failed expression); boxes in the
    video's pixels, boxes_560 as the policy wrote them; error: why the expression could not be evaluated (a
    corrupt video, an engine error), None when it was; empty_reason: why its masks are empty (the answer's
    fault, scored as such)."""

    video: str
    exp_id: str
    expression: str
    type_id: int | None
    multi_instance: bool
    frame_indices: list[int] = field(default_factory=list)
    response: str = ""
    reasoning: str = ""
    parse_failure: str | None = None
    keyframe: int | None = None
    boxes_560: list[list[float]] = field(default_factory=list)
    boxes: list[list[float]] = field(default_factory=list)
    rewards: dict[str, float] = field(default_factory=dict)
    consistency_error: str | None = None
    j: float = math.nan
    f: float = math.nan
    r_release: float = math.nan
    r_corrected: float = math.nan
    empty_reason: str | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """``<video>/<exp_id>``: unique within a split."""
        return f"{self.video}/{self.exp_id}"

    @property
    def jf(self) -> float:
        return (self.j + self.f) / 2

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "jf": self.jf}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ExpressionResult:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in names})


def _record_fields(record: ExpressionRecord) -> dict[str, Any]:
    return {
        "video": record.video,
        "exp_id": str(record.exp_id),
        "expression": record.expression,
        "type_id": record.type_id,
        "multi_instance": record.is_multi_instance,
    }


def expression_result(
    record: ExpressionRecord,
    frame_indices: tuple[int, ...],
    answer: LocatedAnswer,
    rewards: dict[str, float],
    consistency_error: str | None,
    score: ExpressionScore,
) -> ExpressionResult:
    """The result of an evaluated expression: its answer as inference read it, its reward parts on the sampled
    frames (`reward_parts`) and its J, F and R over the video."""
    return ExpressionResult(
        **_record_fields(record),
        frame_indices=[int(i) for i in frame_indices],
        response=answer.text,
        reasoning=answer.reasoning,
        parse_failure=answer.parse_failure,
        keyframe=answer.keyframe,
        boxes_560=np.round(answer.boxes_560.astype(np.float64), 2).tolist(),
        boxes=np.round(answer.boxes.astype(np.float64), 2).tolist(),
        rewards=dict(rewards),
        consistency_error=consistency_error,
        j=score.j,
        f=score.f,
        r_release=score.r_release,
        r_corrected=score.r_corrected,
        empty_reason=answer.empty_reason,
    )


def failed_result(record: ExpressionRecord, error: str) -> ExpressionResult:
    """An expression that could not be evaluated, with the reason (kept out of the means, counted apart)."""
    return ExpressionResult(**_record_fields(record), error=error)
