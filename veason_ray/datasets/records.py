"""Typed records the dataset readers yield (a video, one expression on it) and the format error they raise.

Small frozen dataclasses of plain values (cheap to pickle across processes); masks and frames are decoded on
demand by the reader that produced the record.
"""

from __future__ import annotations

from dataclasses import dataclass


class DatasetFormatError(ValueError):
    """A dataset file that does not follow its format; the message names the file and the JSON path."""


class MissingMaskEntryError(DatasetFormatError):
    """An annotation id that the expression file names is absent from the mask file."""


TYPE_REFERRING = 0
TYPE_REASONING = 1
TYPE_NO_TARGET = 2
TYPE_NAMES = {TYPE_REFERRING: "referring", TYPE_REASONING: "reasoning", TYPE_NO_TARGET: "no_target"}


@dataclass(frozen=True)
class VideoInfo:
    """One video: its frames in order (names without extension, e.g. ``"00000"``) and where they are stored.
    ``height`` and ``width`` are the original frame size in pixels."""

    name: str
    height: int
    width: int
    frame_names: tuple[str, ...]
    frame_uris: tuple[str, ...]

    @property
    def num_frames(self) -> int:
        return len(self.frame_names)


@dataclass(frozen=True)
class ExpressionRecord:
    """One expression of a dataset split.

    ``type_id``: 0 referring, 1 reasoning, 2 no target (ReVOS); None where the dataset has no types (MeViS,
    ReasonVOS). ``obj_ids`` are the target objects' ids within the video and ``anno_ids`` the keys of their
    ground-truth masks, parallel to ``obj_ids`` (mask_dict keys for ReVOS/MeViS, annotation folder names for
    ReasonVOS). ``is_sent`` is ReasonVOS's sentence-vs-phrase flag (None elsewhere).
    """

    dataset: str
    split: str
    video: str
    exp_id: str
    expression: str
    type_id: int | None
    obj_ids: tuple[int, ...]
    anno_ids: tuple[str, ...]
    is_sent: bool | None = None

    @property
    def is_multi_instance(self) -> bool:
        """More than one target object (the method's definition: ``len(obj_id) > 1``)."""
        return len(self.obj_ids) > 1

    @property
    def key(self) -> str:
        """``"<video>/<exp_id>"``, unique within a split."""
        return f"{self.video}/{self.exp_id}"

    @property
    def type_name(self) -> str | None:
        return None if self.type_id is None else TYPE_NAMES[self.type_id]
