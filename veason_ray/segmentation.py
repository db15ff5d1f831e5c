"""From a policy answer to a video's masks: the keyframe-first inference of method.md section 1.

The answer names a keyframe (a frame index of the video) and boxes in 560 space on it; the boxes are scaled to
the video's resolution, and the mask propagator (SAM2) segments them there and propagates forward and backward
through every frame. Shared by evaluation and serving.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from veason_ray.answer_parsing import ParsedAnswer, ParseFailure
from veason_ray.boxes import boxes_560_to_original
from veason_ray.mask_propagation import MaskPropagator


@dataclass(frozen=True)
class VideoSegmentation:
    """Masks of every frame, (T, H, W) bool, and why they are empty when the answer gave nothing usable."""

    masks: np.ndarray
    keyframe: int | None
    boxes: np.ndarray  # (K, 4) in the video's pixels, the boxes given to the propagator
    empty_reason: str | None = None


def segment_video(
    frames: np.ndarray, answer: ParsedAnswer | ParseFailure, propagator: MaskPropagator
) -> VideoSegmentation:
    """frames: (T, H, W, 3) uint8 RGB, all frames of the video at its own resolution. An unparsable answer, a
    keyframe outside the video or no boxes give empty masks with the reason; nothing raises on bad answers."""
    frames = np.asarray(frames)
    num_frames, height, width = frames.shape[:3]
    empty = np.zeros((num_frames, height, width), dtype=bool)
    no_boxes = np.zeros((0, 4), dtype=np.float32)
    if isinstance(answer, ParseFailure):
        return VideoSegmentation(empty, None, no_boxes, f"unparsable answer: {answer.reason.value}")
    if not 0 <= answer.keyframe < num_frames:
        return VideoSegmentation(
            empty, None, no_boxes, f"keyframe {answer.keyframe} outside 0..{num_frames - 1}"
        )
    if len(answer.boxes) == 0:
        return VideoSegmentation(empty, answer.keyframe, no_boxes, "no boxes")
    boxes = boxes_560_to_original(answer.boxes, width, height)
    boxes = np.clip(boxes, 0, [width - 1, height - 1, width - 1, height - 1]).astype(np.float32)
    masks = propagator.propagate(frames, answer.keyframe, boxes)
    return VideoSegmentation(masks, answer.keyframe, boxes)
