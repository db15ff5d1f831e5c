"""Evaluation of one expression: its inputs (sampled frames, prompt, ground truth) and its scores (the reward
parts on the sampled frames, J / F / R on every frame of the video). Pure: the policy's answer comes in as text.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from veason_ray.answer_parsing import ParsedAnswer, parse_answer
from veason_ray.boxes import FRAME_SIZE
from veason_ray.datasets import ExpressionRecord, VOSDataset
from veason_ray.mask_propagation import MaskPropagator
from veason_ray.metrics import score_expression
from veason_ray.prompts import build_messages, render_answer
from veason_ray.rewards import RewardWeights, score_response
from veason_ray.sample_building import SamplingSpec, build_sample
from veason_ray.segmentation import segment_video
from veason_ray.video_decoding import ArrayFrameSource


@dataclass
class EvaluationInputs:
    """Everything one expression's evaluation needs, read once from the dataset."""

    record: ExpressionRecord
    frames: np.ndarray  # (L, H, W, 3) uint8, every frame of the video
    gt_masks: np.ndarray  # (L, H, W) bool GT union masks
    foreground: np.ndarray  # (L, H, W) bool, all annotated objects (for R)
    frame_indices: tuple[int, ...]  # the sampled frames shown to the policy
    frames_560: np.ndarray  # (T, 560, 560, 3) the sampled frames as the policy sees them
    gt_masks_560: np.ndarray  # (T, 560, 560) bool GT union masks at the sampled frames
    gt_boxes_560: list[np.ndarray]  # per sampled frame, (N, 4) GT boxes in 560 space

    def messages(self) -> list[dict[str, Any]]:
        """The chat prompt (system + user turn with the sampled frames)."""
        return build_messages(self.frame_indices, self.record.expression, list(self.frames_560))


@dataclass
class ExpressionResult:
    """The outcome of one expression; plain data (JSON-serialisable through `as_json`)."""

    video: str
    exp_id: str
    expression: str
    type_id: int | None
    multi_instance: bool
    frame_indices: list[int]
    response: str
    parse_failure: str | None
    keyframe: int | None
    boxes_560: list[list[float]]
    rewards: dict[str, float]
    consistency_error: str | None
    j: float
    f: float
    r_release: float
    r_corrected: float
    empty_reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def jf(self) -> float:
        return (self.j + self.f) / 2

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "jf": self.jf}


def load_evaluation_inputs(
    dataset: VOSDataset, record: ExpressionRecord, num_frames: int
) -> EvaluationInputs:
    """Read the video, its GT and foreground, and sample `num_frames` evenly spaced frames for the policy (the
    sampled part is :func:`~veason_ray.sample_building.build_sample` on the frames already read)."""
    frames = dataset.read_frames(record.video)
    sample = build_sample(
        dataset,
        record,
        SamplingSpec(mode="eval", num_frames=num_frames, frame_size=FRAME_SIZE),
        source=ArrayFrameSource(record.video, frames),
    )
    return EvaluationInputs(
        record=record,
        frames=frames,
        gt_masks=dataset.gt_masks(record),
        foreground=dataset.foreground(record.video),
        frame_indices=sample.frame_indices,
        frames_560=sample.frames,
        gt_masks_560=sample.gt_masks_560,
        gt_boxes_560=sample.gt_boxes_560,
    )


def oracle_response(inputs: EvaluationInputs) -> str:
    """The answer a perfect policy would give: the sampled frame with the largest GT union mask (at 560) as the
    keyframe, and the GT boxes of the objects present on it. Scoring it checks the reward and segmentation path
    (and the mask propagator) independently of the policy; no-target expressions get no boxes."""
    areas = inputs.gt_masks_560.reshape(len(inputs.frame_indices), -1).sum(axis=1)
    position = int(np.argmax(areas))
    boxes = inputs.gt_boxes_560[position]
    present = boxes[np.any(boxes != 0, axis=1)] if areas[position] > 0 else np.zeros((0, 4))
    return render_answer("ground truth", inputs.frame_indices[position], present)


def evaluate_answer(
    inputs: EvaluationInputs,
    response: str,
    propagator: MaskPropagator,
    weights: RewardWeights | None = None,
    device: str | None = None,
) -> tuple[ExpressionResult, np.ndarray]:
    """Score `response` for `inputs`: reward parts on the sampled frames (consistency through `propagator` at
    560), then the answer's masks over the whole video and their J, F and R. Returns the result and the
    (L, H, W) predicted masks."""
    record = inputs.record
    reward = score_response(
        response,
        frame_indices=inputs.frame_indices,
        gt_masks=inputs.gt_masks_560,
        gt_boxes=inputs.gt_boxes_560,
        frames=inputs.frames_560,
        propagator=propagator,
        weights=weights,
    )
    parsed = parse_answer(response)
    segmentation = segment_video(inputs.frames, parsed, propagator)
    score = score_expression(
        segmentation.masks, inputs.gt_masks, record.type_id, inputs.foreground, device=device
    )
    result = ExpressionResult(
        video=record.video,
        exp_id=str(record.exp_id),
        expression=record.expression,
        type_id=record.type_id,
        multi_instance=record.is_multi_instance,
        frame_indices=list(inputs.frame_indices),
        response=response,
        parse_failure=reward.parse_failure.value if reward.parse_failure else None,
        keyframe=parsed.keyframe if isinstance(parsed, ParsedAnswer) else None,
        boxes_560=parsed.boxes.tolist() if isinstance(parsed, ParsedAnswer) else [],
        rewards={
            "format": reward.format,
            "keyframe": reward.keyframe,
            "spatial": reward.spatial,
            "consistency": reward.consistency,
            "total": reward.total,
        },
        consistency_error=reward.consistency_error,
        j=score.j,
        f=score.f,
        r_release=score.r_release,
        r_corrected=score.r_corrected,
        empty_reason=segmentation.empty_reason,
    )
    return result, segmentation.masks
