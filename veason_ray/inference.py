"""Inference as one API: a video and a query in, the policy's answer and a mask of every frame out (docs/method.md
section 1). No ground truth goes in; evaluation is this + scoring, and the Serve app is this behind HTTP.

    frames (L, H, W, 3) + query
      -> policy_input      the N evenly spaced frames the policy sees (560x560) and its chat prompt
      -> AnswerGenerator   the answer text (Hugging Face in process, or a vLLM engine: actors/rollout.py)
      -> locate_answer     the parsed answer -> keyframe and boxes at the video's resolution, or why none
      -> propagate_answers masks of every frame through the MaskPropagator seam (SAM2: forward and backward
                           from the keyframe, at the video's own resolution)

`VideoSegmenter` composes the four for callers that hold both models in one process (`veason infer`, the
Serve app); the evaluation job (pipelines/evaluate.py) runs the same steps on separate Ray pools.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from veason_ray.answer_parsing import ParsedAnswer, parse_answer
from veason_ray.boxes import FRAME_SIZE, boxes_560_to_original
from veason_ray.config import InferenceConfig
from veason_ray.frame_sampling import sample_evaluation_frames
from veason_ray.frames import resize_frames
from veason_ray.mask_propagation import MaskPropagator, PropagationRequest
from veason_ray.prompts import build_messages, constrained_answer_max_chars


@dataclass(frozen=True)
class PolicyInput:
    """What the policy is shown: `frames` (N, S, S, 3) uint8 at `frame_indices` of the video (ascending; the
    prompt's timestamps) and the query. Built by `policy_input`; no ground truth."""

    query: str
    frame_indices: tuple[int, ...]
    frames: np.ndarray

    def messages(self) -> list[dict[str, Any]]:
        """The chat prompt: the system prompt, then the timestamped frames and the instruction."""
        return build_messages(self.frame_indices, self.query, list(self.frames))


def policy_frame_indices(num_video_frames: int, num_frames: int = 8) -> tuple[int, ...]:
    """Which frames of a video of `num_video_frames` frames the policy sees: `num_frames` evenly spaced
    indices, first and last included (docs/method.md section 3, evaluation sampling)."""
    return sample_evaluation_frames(num_video_frames, num_frames)


def policy_frames(frames: np.ndarray, frame_size: int = FRAME_SIZE) -> np.ndarray:
    """The policy's frames from the video's frames at `policy_frame_indices` (T, H, W, 3) uint8: resized to
    frame_size x frame_size, bilinear, aspect ratio not kept."""
    return resize_frames(frames, frame_size)


def policy_view(
    frames: np.ndarray, num_frames: int = 8, frame_size: int = FRAME_SIZE
) -> tuple[tuple[int, ...], np.ndarray]:
    """The frames the policy sees of a video, shared by every query on it: the `policy_frame_indices` of
    `frames` (L, H, W, 3) uint8 (every frame of the video) and those frames resized to frame_size x frame_size
    (bilinear, `frames.resize_frames`)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be (L, H, W, 3) uint8 with L >= 1, got {frames.shape} {frames.dtype}")
    indices = policy_frame_indices(len(frames), num_frames)
    return indices, policy_frames(frames[list(indices)], frame_size)


def policy_input(
    frames: np.ndarray, query: str, num_frames: int = 8, frame_size: int = FRAME_SIZE
) -> PolicyInput:
    """The policy's input for one query on a video: its `policy_view` and the query."""
    if not isinstance(query, str) or not query.strip():
        raise ValueError("the query is empty: say what to segment, e.g. 'the dog that is about to jump'")
    indices, view = policy_view(frames, num_frames, frame_size)
    return PolicyInput(query, indices, view)


def check_answer_budget(settings: InferenceConfig, max_frame_index: int) -> None:
    """Refuse constrained decoding whose longest answer does not fit `inference.max_new_tokens` (it would be cut
    inside the think block and never parse), naming the keys to change."""
    if not settings.constrain_answer:
        return
    longest = constrained_answer_max_chars(
        max_frame_index, settings.constrained_think_chars, settings.constrained_max_boxes
    )
    if longest > settings.max_new_tokens:
        raise ValueError(
            f"inference.constrain_answer: an answer may take up to {longest} tokens but "
            f"inference.max_new_tokens is {settings.max_new_tokens}; raise inference.max_new_tokens or lower "
            "inference.constrained_think_chars / inference.constrained_max_boxes"
        )


class AnswerGenerator(abc.ABC):
    """The policy behind the inference seam: one answer text per input, in order."""

    @abc.abstractmethod
    def answer(self, inputs: Sequence[PolicyInput]) -> list[str]:
        """The policy's answer (think + answer block) to each input; never fewer than given."""


@dataclass(frozen=True)
class LocatedAnswer:
    """An answer read for segmentation. keyframe: a frame index of the video (None when unusable); boxes_560
    (K, 4) as the policy wrote them; boxes (K, 4) float32 in the video's pixels, clipped to the frame;
    empty_reason: why no mask can follow (unparsable answer, keyframe outside the video, no boxes), else None."""

    text: str
    reasoning: str
    keyframe: int | None
    boxes_560: np.ndarray
    boxes: np.ndarray
    parse_failure: str | None
    empty_reason: str | None

    @property
    def usable(self) -> bool:
        return self.empty_reason is None


def locate_answer(text: str, num_video_frames: int, height: int, width: int) -> LocatedAnswer:
    """Parse `text` and place its boxes on the video (num_video_frames frames of height x width pixels); never
    raises on a bad answer: it is returned with its `empty_reason`."""
    parsed = parse_answer(text)
    no_boxes = np.zeros((0, 4), dtype=np.float32)
    if not isinstance(parsed, ParsedAnswer):
        reason = parsed.reason.value
        return LocatedAnswer(
            text, parsed.think, None, no_boxes, no_boxes, reason, f"unparsable answer: {reason}"
        )
    boxes_560 = parsed.boxes.astype(np.float32)
    if not 0 <= parsed.keyframe < num_video_frames:
        reason = f"keyframe {parsed.keyframe} outside 0..{num_video_frames - 1}"
        return LocatedAnswer(text, parsed.think, None, boxes_560, no_boxes, None, reason)
    if len(boxes_560) == 0:
        return LocatedAnswer(text, parsed.think, parsed.keyframe, boxes_560, no_boxes, None, "no boxes")
    boxes = boxes_560_to_original(boxes_560, width, height)
    boxes = np.clip(boxes, 0, [width - 1, height - 1, width - 1, height - 1]).astype(np.float32)
    return LocatedAnswer(text, parsed.think, parsed.keyframe, boxes_560, boxes, None, None)


def propagate_answers(
    videos: Mapping[Hashable, np.ndarray],
    answers: Sequence[tuple[Hashable, LocatedAnswer]],
    propagator: MaskPropagator,
) -> list[np.ndarray]:
    """(L, H, W) bool masks of every frame for each (video key, answer): the usable answers go to the
    propagator in one `propagate_many` call (SAM2's batched propagator encodes each video once for all of its
    answers); an unusable answer gets empty masks."""
    requests = [
        PropagationRequest(key, int(answer.keyframe), answer.boxes)
        for key, answer in answers
        if answer.usable
    ]
    propagated = iter(propagator.propagate_many(videos, requests) if requests else [])
    return [
        next(propagated) if answer.usable else np.zeros(np.asarray(videos[key]).shape[:3], dtype=bool)
        for key, answer in answers
    ]


@dataclass
class VideoSegmentation:
    """One query's result. masks: (L, H, W) bool, every frame of the video at its resolution; boxes: (K, 4) in
    the video's pixels, given to the propagator on `keyframe`; seconds: the stages of the call that produced
    it (a batched call's stages are shared by its requests)."""

    query: str
    frame_indices: tuple[int, ...]
    answer: str
    reasoning: str
    keyframe: int | None
    boxes: np.ndarray
    boxes_560: np.ndarray
    masks: np.ndarray
    parse_failure: str | None
    empty_reason: str | None
    seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(
        cls, policy_in: PolicyInput, located: LocatedAnswer, masks: np.ndarray, seconds: Mapping[str, float]
    ) -> VideoSegmentation:
        """The result of one query from its steps: what the policy saw, its located answer, the masks."""
        return cls(
            query=policy_in.query,
            frame_indices=policy_in.frame_indices,
            answer=located.text,
            reasoning=located.reasoning,
            keyframe=located.keyframe,
            boxes=located.boxes,
            boxes_560=located.boxes_560,
            masks=masks,
            parse_failure=located.parse_failure,
            empty_reason=located.empty_reason,
            seconds=dict(seconds),
        )

    def as_json(self) -> dict[str, Any]:
        """Everything but the masks, as JSON values."""
        return {
            "query": self.query,
            "frame_indices": list(self.frame_indices),
            "answer": self.answer,
            "reasoning": self.reasoning,
            "keyframe": self.keyframe,
            "boxes": np.round(self.boxes.astype(np.float64), 2).tolist(),
            "boxes_560": np.round(self.boxes_560.astype(np.float64), 2).tolist(),
            "parse_failure": self.parse_failure,
            "empty_reason": self.empty_reason,
            "mask_frames_nonempty": int(self.masks.reshape(len(self.masks), -1).any(axis=1).sum()),
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
        }


class VideoSegmenter:
    """The whole chain in one process: an answer generator and a mask propagator.

    num_frames: frames the policy sees (evaluation sampling); frame_size: their side in pixels."""

    def __init__(
        self,
        generator: AnswerGenerator,
        propagator: MaskPropagator,
        num_frames: int = 8,
        frame_size: int = FRAME_SIZE,
    ):
        self.generator, self.propagator = generator, propagator
        self.num_frames, self.frame_size = num_frames, frame_size

    def segment(self, frames: np.ndarray, query: str) -> VideoSegmentation:
        return self.segment_many([frames], [query])[0]

    def segment_many(self, videos: Sequence[np.ndarray], queries: Sequence[str]) -> list[VideoSegmentation]:
        """One result per (video, query) pair; the policy answers all of them in one batch and the propagator
        receives every usable answer in one call. Stage seconds: prepare (frame choice and resize), policy,
        locate (parsing), propagate."""
        if len(videos) != len(queries):
            raise ValueError(f"{len(videos)} videos for {len(queries)} queries")
        clock = time.perf_counter()
        inputs = [
            policy_input(v, q, self.num_frames, self.frame_size) for v, q in zip(videos, queries, strict=True)
        ]
        seconds = {"prepare": time.perf_counter() - clock}
        clock = time.perf_counter()
        texts = self.generator.answer(inputs)
        seconds["policy"] = time.perf_counter() - clock
        clock = time.perf_counter()
        located = [
            locate_answer(text, len(v), v.shape[1], v.shape[2]) for text, v in zip(texts, videos, strict=True)
        ]
        seconds["locate"] = time.perf_counter() - clock
        clock = time.perf_counter()
        masks = propagate_answers(dict(enumerate(videos)), list(enumerate(located)), self.propagator)
        seconds["propagate"] = time.perf_counter() - clock
        return [
            VideoSegmentation.of(i, a, m, seconds) for i, a, m in zip(inputs, located, masks, strict=True)
        ]
