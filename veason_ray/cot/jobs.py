"""One CoT sample ready for a teacher: frames, keyframe, per-object boxes (docs/method.md section 6).

The keyframe is drawn from the 5 frames with the largest ground-truth union mask and up to 7 frames are spread
over the video around it (:func:`veason_ray.frame_sampling.sample_training_frames`), with a generator seeded
by (run seed, sample key) so a rerun rebuilds the same sample. The answer's boxes are the ground-truth boxes of
the keyframe in 560 space (:func:`veason_ray.boxes.ground_truth_boxes_560`, what the spatial reward compares
against), one per target object present on the keyframe. An object absent from the keyframe has no box to
draw or predict: its box is left out (a [0, 0, 0, 0] box would teach the policy to emit degenerate boxes and
would prompt SAM2 with nothing). The keyframe has the largest union area among its candidates, so this only
happens to some objects of multi-object expressions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from veason_ray.boxes import FRAME_SIZE, ground_truth_boxes_560, mask_box
from veason_ray.cot.frames import TEACHER_MAX_SIZE, record_frames, teacher_image
from veason_ray.datasets import ExpressionRecord, VOSDataset
from veason_ray.frame_sampling import KEYFRAME_CANDIDATES, sample_training_frames
from veason_ray.sample_building import gt_union_areas, sample_key, sample_rng
from veason_ray.video_decoding import BadDataError, frame_source

DEFAULT_COT_FRAMES = 7


class NoVisibleTargetError(BadDataError):
    """An expression whose targets are absent from every frame: there is no keyframe or box to teach."""

    reason = "no_visible_target"


@dataclass(frozen=True)
class FrameSpec:
    """How a CoT sample's frames are chosen and drawn: frames per sample (keyframe included), keyframe
    candidates, record frame side (pixels), teacher image bound (width, height) and box line width (pixels)."""

    num_frames: int = DEFAULT_COT_FRAMES
    keyframe_top_k: int = KEYFRAME_CANDIDATES
    frame_size: int = FRAME_SIZE
    teacher_max_size: tuple[int, int] = TEACHER_MAX_SIZE
    box_thickness: int = 2
    seed: int = 0
    video_format: str = "jpeg"
    video_backend: str = "pyav"


@dataclass
class CoTJob:
    """One sample for the teacher.

    frame_indices: sampled frames (ascending; the prompt's timestamps); keyframe: one of them.
    clean_frames: (T, S, S, 3) uint8 RGB at frame_size, what the SFT record stores.
    teacher_images: T images (h, w, 3) uint8 RGB within the teacher bound, red boxes drawn.
    object_boxes: per frame, per target object, its tight box in original pixels (inclusive) or None.
    area_fractions: (T,) GT union area / frame area at each sampled frame.
    boxes_560: (K', 4) keyframe boxes in 560 space of the objects present there; present_obj_ids their ids.
    original_size: (height, width) of the video in pixels.
    """

    key: str
    record: ExpressionRecord
    frame_indices: tuple[int, ...]
    keyframe: int
    clean_frames: np.ndarray
    teacher_images: list[np.ndarray]
    object_boxes: list[list[np.ndarray | None]]
    area_fractions: np.ndarray
    boxes_560: np.ndarray
    present_obj_ids: tuple[int, ...]
    original_size: tuple[int, int]

    @property
    def keyframe_position(self) -> int:
        return self.frame_indices.index(self.keyframe)


def build_cot_job(dataset: VOSDataset, record: ExpressionRecord, spec: FrameSpec) -> CoTJob:
    """Read and prepare one expression (only its sampled frames are decoded). Raises NoVisibleTargetError when
    no target is visible anywhere, other BadDataError subclasses for unusable frames or masks."""
    key = sample_key(record)
    areas = gt_union_areas(dataset, record)
    if not areas.any():
        raise NoVisibleTargetError(
            f"expression {key}: no target visible on any frame (type {record.type_id})"
        )
    chosen = sample_training_frames(
        areas, sample_rng(spec.seed, key, 0), spec.num_frames, spec.keyframe_top_k
    )
    indices = list(chosen.frame_indices)
    info = dataset.video(record.video)
    frames = frame_source(dataset, record.video, spec.video_format, spec.video_backend, info).read(indices)
    object_masks = dataset.object_masks(record, indices)  # (K, T, H, W); entries checked by gt_union_areas
    object_boxes = [
        [mask_box(object_masks[k, t]) for k in range(len(object_masks))] for t in range(len(indices))
    ]
    position = indices.index(chosen.keyframe)
    present = [k for k, box in enumerate(object_boxes[position]) if box is not None]
    gt_560 = ground_truth_boxes_560(object_masks[present, position])
    return CoTJob(
        key=key,
        record=record,
        frame_indices=chosen.frame_indices,
        keyframe=chosen.keyframe,
        clean_frames=record_frames(frames, spec.frame_size),
        teacher_images=[
            teacher_image(frame, boxes, spec.teacher_max_size, spec.box_thickness)
            for frame, boxes in zip(frames, object_boxes, strict=True)
        ],
        object_boxes=object_boxes,
        area_fractions=areas[indices] / float(info.height * info.width),
        boxes_560=gt_560,
        present_obj_ids=tuple(record.obj_ids[k] for k in present),
        original_size=(info.height, info.width),
    )
