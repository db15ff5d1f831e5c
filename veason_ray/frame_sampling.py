"""Which frames of a video the policy sees (docs/method.md section 3).

Training: a keyframe drawn at random from the 5 frames with the largest ground-truth union mask, and exactly N
frames in all (default 6) spread evenly over the video with the keyframe among them (ours; the release asks for
6 and gets at most 5), on an evenly spaced grid through the keyframe, so that no frame stands out by its
position (ours; see :func:`spread_frames`). Evaluation: N evenly spaced frames (release: 8, numpy linspace).
Frame indices are positions in the video's frame list, ascending; they are also the prompt's timestamps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_TRAIN_FRAMES = 6
DEFAULT_EVAL_FRAMES = 8
KEYFRAME_CANDIDATES = 5


@dataclass(frozen=True)
class TrainingFrames:
    """Sampled frame indices (ascending, distinct) and the keyframe among them."""

    frame_indices: tuple[int, ...]
    keyframe: int

    @property
    def keyframe_position(self) -> int:
        """Index of the keyframe within frame_indices."""
        return self.frame_indices.index(self.keyframe)


def top_area_frames(mask_areas: Sequence[int] | np.ndarray, count: int = KEYFRAME_CANDIDATES) -> list[int]:
    """Indices of the `count` frames with the largest GT mask area (pixels), largest first; ties go to the
    earlier frame."""
    areas = np.asarray(mask_areas)
    order = np.lexsort((np.arange(areas.size), -areas.astype(np.float64)))
    return [int(i) for i in order[:count]]


def spread_frames(num_video_frames: int, num_frames: int, keyframe: int) -> tuple[int, ...]:
    """Exactly min(num_frames, num_video_frames) distinct indices spread evenly over the video, keyframe included.

    The video is cut into N equal segments (frame x belongs to segment floor(x * N / L)); the keyframe lies in
    segment p, and frame j is keyframe + floor((j - p) * L / N): one frame per segment, a grid of stride L / N
    through the keyframe, so every frame is as regular as the keyframe and no timestamp tells which one it is.
    (An earlier rule took each other segment's middle frame: the keyframe was then the one timestamp off the
    middles, and on videos of one length a policy learned to pick the odd one out, a training reward that did
    not carry to evenly spaced evaluation frames; docs/benchmarks.md, "Learning, measured".) Each keyframe
    candidate brings its own grid, so a sample's candidate frames number up to N * k instead of N + k - 1."""
    if not 0 <= keyframe < num_video_frames:
        raise ValueError(f"keyframe {keyframe} outside a video of {num_video_frames} frames")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if num_video_frames <= num_frames:
        return tuple(range(num_video_frames))
    length, n = num_video_frames, num_frames
    slot = keyframe * n // length
    # exact integer floors: >= 0 and < length because the keyframe lies in segment `slot`; distinct as L > N
    return tuple(keyframe + (j - slot) * length // n for j in range(n))


def sample_training_frames(
    mask_areas: Sequence[int] | np.ndarray,
    rng: np.random.Generator,
    num_frames: int = DEFAULT_TRAIN_FRAMES,
    candidates: int = KEYFRAME_CANDIDATES,
) -> TrainingFrames:
    """Training frames of one expression.

    mask_areas: (L,) GT union mask area of every video frame, in pixels (any resolution, only the order matters).
    The keyframe is drawn uniformly from the `candidates` largest-area frames with `rng`; the rest is
    deterministic, so the same generator state gives the same frames."""
    areas = np.asarray(mask_areas)
    if areas.ndim != 1 or areas.size == 0:
        raise ValueError(f"mask_areas must be a non-empty 1-D sequence, got shape {areas.shape}")
    keyframe = int(rng.choice(top_area_frames(areas, candidates)))
    return TrainingFrames(spread_frames(areas.size, num_frames, keyframe), keyframe)


def sample_evaluation_frames(num_video_frames: int, num_frames: int = DEFAULT_EVAL_FRAMES) -> tuple[int, ...]:
    """N evenly spaced frame indices, first and last included (release: np.linspace(0, L-1, N, dtype=int));
    every frame when the video has no more than N."""
    if num_video_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {num_video_frames}")
    if num_video_frames <= num_frames:
        return tuple(range(num_video_frames))
    return tuple(int(i) for i in np.linspace(0, num_video_frames - 1, num=num_frames, dtype=int))
