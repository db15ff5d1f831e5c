"""The mask-propagator seam: boxes on one frame in, a mask for every frame out.

The consistency reward and evaluation call only this interface. Implementations: SAM2
(`veason_ray/models/sam2_propagator.py`, batched in `sam2_group.py`), the default and what users run; a
classical colour tracker for the synthetic world (`veason_ray/models/colour_propagator.py`), chosen by
`reward.propagator`; tests use small fakes.
"""

from __future__ import annotations

import abc
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PropagationRequest:
    """One answer's propagation: `boxes` (K, 4) float32 x1,y1,x2,y2 in the pixels of the frames of `video`
    (a key into the videos given alongside), all on the frame at `keyframe_position` (0..T-1)."""

    video: Hashable
    keyframe_position: int
    boxes: np.ndarray


class MaskPropagator(abc.ABC):
    @abc.abstractmethod
    def propagate(self, frames: np.ndarray, keyframe_position: int, boxes: np.ndarray) -> np.ndarray:
        """frames: (T, H, W, 3) uint8 RGB, the sampled frames in temporal order; keyframe_position: index into
        frames (0..T-1) of the frame the boxes are on; boxes: (K, 4) float32 x1,y1,x2,y2 in the pixels of `frames`.
        Returns (T, H, W) bool: OR over the K objects of the propagated masks (logits > 0). K == 0 -> all False."""

    def propagate_many(
        self, videos: Mapping[Hashable, np.ndarray], requests: Sequence[PropagationRequest]
    ) -> list[np.ndarray]:
        """(T, H, W) bool masks per request, in request order; `videos` maps each request's `video` key to its
        (T, H, W, 3) uint8 frames. This default propagates one request at a time; implementations that share
        work across requests (SAM2's image features) override it."""
        return [self.propagate(videos[r.video], r.keyframe_position, r.boxes) for r in requests]

    def propagate_frames(
        self, frames: np.ndarray, keyframe_position: int, boxes: np.ndarray
    ) -> Iterator[tuple[int, np.ndarray]]:
        """`propagate` frame by frame: (frame position, (H, W) bool mask) for every frame once, in
        `propagation_order` (the keyframe, forward to the last frame, then backward to the first), for callers
        that stream masks out as they come. This default propagates the whole clip first; SAM2 yields each frame
        as it is tracked."""
        masks = self.propagate(frames, keyframe_position, boxes)
        for position in propagation_order(len(masks), int(keyframe_position)):
            yield position, masks[position]


def propagation_order(num_frames: int, keyframe_position: int) -> list[int]:
    """The order in which propagation reaches the frames of a clip: the keyframe, the frames after it, then
    the frames before it from the nearest back to the first."""
    return [*range(keyframe_position, num_frames), *range(keyframe_position - 1, -1, -1)]


def check_propagation_inputs(frames: np.ndarray, keyframe_position: int, boxes: np.ndarray) -> None:
    """Raise ValueError unless frames are (T, H, W, 3) uint8, 0 <= keyframe_position < T and boxes (K, 4)."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be (T, H, W, 3) uint8 with T >= 1, got {frames.shape} {frames.dtype}")
    if not 0 <= keyframe_position < len(frames):
        raise ValueError(f"keyframe_position {keyframe_position} is outside 0..{len(frames) - 1}")
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (K, 4) x1,y1,x2,y2, got shape {boxes.shape}")


def checked_propagation_inputs(
    frames: np.ndarray, keyframe_position: int, boxes: np.ndarray
) -> tuple[np.ndarray, int, np.ndarray]:
    """`propagate`'s arguments as arrays (boxes float32, an empty list as (0, 4)), checked by
    `check_propagation_inputs`: what every implementation starts with."""
    frames = np.asarray(frames)
    keyframe_position = int(keyframe_position)
    boxes = np.asarray(boxes, dtype=np.float32)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    check_propagation_inputs(frames, keyframe_position, boxes)
    return frames, keyframe_position, boxes
