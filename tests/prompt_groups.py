"""Random-frame PromptGroups for the tests of the rollout pool and the learner (no dataset needed)."""

from __future__ import annotations

import numpy as np

from veason_ray.records import ExpressionRecord, PromptGroup, Sample

FRAME = 112  # 112x112 frames: 16 visual tokens each, to keep CPU time low (the code path is that of 560)


def make_group(group_id: int, num_frames: int = 2, seed: int | None = None, size: int = FRAME) -> PromptGroup:
    """A group of `num_frames` random frames (seeded by `seed`, default the group id) at `size` pixels."""
    rng = np.random.default_rng(group_id if seed is None else seed)
    frames = rng.integers(0, 256, (num_frames, size, size, 3), dtype=np.uint8)
    record = ExpressionRecord(
        "synthetic", "train", f"video{group_id}", "0", "the red square moving left", 0, (1,), ("1",)
    )
    sample = Sample(
        record=record,
        frame_indices=tuple(range(0, 3 * num_frames, 3)),
        keyframe=0,
        frames=frames,
        gt_masks_560=np.zeros((num_frames, 8, 8), dtype=bool),
        gt_boxes_560=[np.zeros((1, 4)) for _ in range(num_frames)],
        original_size=(size, size),
        num_video_frames=3 * num_frames,
    )
    return PromptGroup(group_id=group_id, sample=sample)
