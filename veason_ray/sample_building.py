"""From a dataset record to a model-ready :class:`~veason_ray.records.Sample` (docs/method.md section 3).

    spec = SamplingSpec(mode="train", num_frames=6, seed=0)
    sample = build_sample(dataset, record, spec, epoch=3)   # decodes only the 6 sampled frames

Frame indices come from :mod:`veason_ray.frame_sampling` (training: the keyframe drawn among the top-k frames by
GT union area, read from the RLEs without decoding the masks; evaluation: evenly spaced). The generator of a
training draw is seeded by (seed, sample key, epoch), so a sample is the same wherever and whenever it is built.
Only the sampled frames are decoded (:mod:`veason_ray.video_decoding`), resized to 560x560 (bilinear), with the
GT union masks at 560 (nearest) and the per-object GT boxes in 560 space (:func:`ground_truth_boxes_560`).

A :class:`FrameMaterial` is the decoded part of a sample at a set of frames. Built at the *candidate* frames (every
frame any epoch's draw can pick: at most N * k), it gives the exact sample of every epoch without decoding
again; the frame cache of ``pipelines/frame_stream.py`` stores these.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np

from veason_ray.boxes import FRAME_SIZE, ground_truth_boxes_560, resize_masks_nearest
from veason_ray.datasets import DatasetFormatError, ExpressionRecord, MissingMaskEntryError, VOSDataset
from veason_ray.frame_sampling import (
    KEYFRAME_CANDIDATES,
    sample_evaluation_frames,
    sample_training_frames,
    spread_frames,
    top_area_frames,
)
from veason_ray.records import Sample, sample_key
from veason_ray.video_decoding import BadDataError, FrameSource, frame_source

Mode = Literal["train", "eval"]


class MissingMaskError(BadDataError):
    """An expression whose ground-truth mask entry is absent (no mask_dict key, no annotation folder)."""

    reason = "missing_mask"


class CorruptMaskError(BadDataError):
    """A ground-truth mask entry that does not decode or does not fit the video."""

    reason = "corrupt_mask"


@dataclass(frozen=True)
class SamplingSpec:
    """How frames are chosen and prepared. ``num_frames``: frames shown to the policy (train: N with the keyframe,
    eval: N evenly spaced); ``keyframe_top_k``: training keyframe candidates; ``frame_size``: square side in
    pixels; ``seed``: the run seed of training draws."""

    mode: Mode
    num_frames: int
    keyframe_top_k: int = KEYFRAME_CANDIDATES
    frame_size: int = FRAME_SIZE
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("train", "eval"):
            raise ValueError(f"sampling mode {self.mode!r}: expected 'train' or 'eval'")


def sample_rng(seed: int, key: str, epoch: int) -> np.random.Generator:
    """The generator of one sample's draw: a function of (seed, key, epoch) only (not of process or order)."""
    digest = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([int(seed), int(epoch), digest])


def gt_union_areas(dataset: VOSDataset, record: ExpressionRecord) -> np.ndarray:
    """(L,) int64 GT union area of every frame (the reader's `gt_areas`: from RLEs where the format has them),
    with mask problems as MissingMaskError / CorruptMaskError."""
    with _mask_errors(record):
        return dataset.gt_areas(record)


@contextmanager
def _mask_errors(record: ExpressionRecord) -> Iterator[None]:
    """Reader errors about masks -> MissingMaskError (absent) / CorruptMaskError (unusable)."""
    try:
        yield
    except (FileNotFoundError, MissingMaskEntryError) as e:
        raise MissingMaskError(f"{e} (expression {record.key})") from None
    except (DatasetFormatError, KeyError) as e:
        raise CorruptMaskError(f"{e} (expression {record.key})") from None


# --- which frames ----------------------------------------------------------------------------------------
def choose_frames(
    spec: SamplingSpec, num_video_frames: int, areas: np.ndarray | None, rng: np.random.Generator | None
) -> tuple[tuple[int, ...], int | None]:
    """(frame indices, training keyframe or None) for one sample; ``areas`` and ``rng`` are needed in training."""
    if spec.mode == "eval":
        return sample_evaluation_frames(num_video_frames, spec.num_frames), None
    if areas is None or rng is None:
        raise ValueError("training frames need the GT areas and a generator")
    chosen = sample_training_frames(areas, rng, spec.num_frames, spec.keyframe_top_k)
    return chosen.frame_indices, chosen.keyframe


def candidate_frames(spec: SamplingSpec, num_video_frames: int, areas: np.ndarray | None) -> tuple[int, ...]:
    """Every frame index a draw of :func:`choose_frames` can return, ascending (eval: the N frames; train: the
    union of the spreads around each keyframe candidate, at most N * k)."""
    if spec.mode == "eval":
        return sample_evaluation_frames(num_video_frames, spec.num_frames)
    if areas is None:
        raise ValueError("training candidates need the GT areas")
    keyframes = top_area_frames(areas, spec.keyframe_top_k)
    return tuple(sorted({i for k in keyframes for i in spread_frames(num_video_frames, spec.num_frames, k)}))


# --- decoded material and samples ------------------------------------------------------------------------
@dataclass
class FrameMaterial:
    """One expression decoded at ``frame_indices`` (ascending): frames (T, S, S, 3) uint8 RGB at frame_size,
    GT union masks (T, S, S) bool, per-frame per-object GT boxes (N, 4) in 560 space; ``areas`` (L,) the GT union
    area of every video frame (training only, for the keyframe draw); original_size (height, width)."""

    record: ExpressionRecord
    frame_indices: tuple[int, ...]
    frames: np.ndarray
    gt_masks: np.ndarray
    gt_boxes: list[np.ndarray]
    areas: np.ndarray | None
    original_size: tuple[int, int]
    num_video_frames: int

    def sample(self, frame_indices: tuple[int, ...], keyframe: int | None) -> Sample:
        """The :class:`Sample` at ``frame_indices`` (a subset of this material's)."""
        position = {i: p for p, i in enumerate(self.frame_indices)}
        missing = [i for i in frame_indices if i not in position]
        if missing:
            raise KeyError(
                f"{sample_key(self.record)}: frames {missing} not in the material {self.frame_indices}"
            )
        picked = [position[i] for i in frame_indices]
        whole = picked == list(range(len(self.frame_indices)))
        return Sample(
            record=self.record,
            frame_indices=tuple(frame_indices),
            keyframe=keyframe,
            frames=self.frames if whole else self.frames[picked],
            gt_masks_560=self.gt_masks if whole else self.gt_masks[picked],
            gt_boxes_560=[self.gt_boxes[p] for p in picked],
            original_size=self.original_size,
            num_video_frames=self.num_video_frames,
        )

    def draw(self, spec: SamplingSpec, epoch: int) -> Sample:
        """The sample of ``epoch``: the same as :func:`build_sample` for this record, spec and epoch (the
        material must hold the candidate frames)."""
        rng = sample_rng(spec.seed, sample_key(self.record), epoch) if spec.mode == "train" else None
        indices, keyframe = choose_frames(spec, self.num_video_frames, self.areas, rng)
        return self.sample(indices, keyframe)


def read_material(
    dataset: VOSDataset,
    record: ExpressionRecord,
    frame_indices: tuple[int, ...],
    source: FrameSource,
    frame_size: int = FRAME_SIZE,
    areas: np.ndarray | None = None,
) -> FrameMaterial:
    """Decode ``frame_indices`` of the record's video from ``source`` (resized to frame_size) and its GT there."""
    info = dataset.video(record.video)
    gt_masks, gt_boxes = read_ground_truth(dataset, record, frame_indices, frame_size)
    return FrameMaterial(
        record=record,
        frame_indices=tuple(int(i) for i in frame_indices),
        frames=source.read(list(frame_indices), size=frame_size),
        gt_masks=gt_masks,
        gt_boxes=gt_boxes,
        areas=areas,
        original_size=(info.height, info.width),
        num_video_frames=info.num_frames,
    )


def read_ground_truth(
    dataset: VOSDataset, record: ExpressionRecord, frame_indices: Sequence[int], frame_size: int = FRAME_SIZE
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The record's GT at ``frame_indices`` as the rewards see it: union masks (T, S, S) bool (nearest) and per
    frame the (N, 4) GT boxes in 560 space. Raises MissingMaskError / CorruptMaskError for unusable masks."""
    info = dataset.video(record.video)
    indices = list(frame_indices)
    with _mask_errors(record):
        object_masks = dataset.object_masks(record, indices)  # (K, T, H, W): only those frames
    union = (
        object_masks.any(axis=0)
        if len(object_masks)
        else np.zeros((len(indices), info.height, info.width), bool)
    )
    boxes = [ground_truth_boxes_560(object_masks[:, t]) for t in range(len(indices))]
    return resize_masks_nearest(union, frame_size), boxes


def build_material(
    dataset: VOSDataset,
    record: ExpressionRecord,
    spec: SamplingSpec,
    epoch: int | None = None,
    source: FrameSource | None = None,
    video_format: str = "jpeg",
    backend: str = "pyav",
) -> FrameMaterial:
    """The record decoded at the frames of ``epoch``'s draw, or with ``epoch`` None at its candidate frames
    (then :meth:`FrameMaterial.draw` gives every epoch's sample without decoding again). Frames come from
    ``source``, default the record's video in ``video_format``. Raises a BadDataError subclass for unusable data."""
    info = dataset.video(record.video)
    areas = gt_union_areas(dataset, record) if spec.mode == "train" else None
    if epoch is None:
        indices = candidate_frames(spec, info.num_frames, areas)
    else:
        rng = sample_rng(spec.seed, sample_key(record), epoch) if spec.mode == "train" else None
        indices, _ = choose_frames(spec, info.num_frames, areas, rng)
    if source is None:
        source = frame_source(dataset, record.video, video_format, backend, info)
    return read_material(dataset, record, indices, source, spec.frame_size, areas)


def build_sample(
    dataset: VOSDataset,
    record: ExpressionRecord,
    spec: SamplingSpec,
    epoch: int = 0,
    source: FrameSource | None = None,
    video_format: str = "jpeg",
    backend: str = "pyav",
) -> Sample:
    """The model-ready sample of ``record`` for ``epoch``; only its sampled frames are decoded."""
    return build_material(dataset, record, spec, epoch, source, video_format, backend).draw(spec, epoch)
