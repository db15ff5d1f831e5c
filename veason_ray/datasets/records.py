"""Typed records the dataset readers yield (a video, one expression on it) and the format error they raise.

Small frozen dataclasses of plain values (cheap to pickle across processes); masks and frames are decoded on
demand by the reader that produced the record. `ExpressionRecord` and the expression types are defined with
the other records that cross process boundaries (`veason_ray/records.py`, which `Sample` builds on) and named
here too, for the readers and their callers.
"""

from __future__ import annotations

from dataclasses import dataclass

from veason_ray.records import TYPE_NAMES, TYPE_NO_TARGET, TYPE_REASONING, TYPE_REFERRING, ExpressionRecord


class DatasetFormatError(ValueError):
    """A dataset file that does not follow its format; the message names the file and the JSON path."""


class MissingMaskEntryError(DatasetFormatError):
    """An annotation id that the expression file names is absent from the mask file."""


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


__all__ = [
    "TYPE_NAMES",
    "TYPE_NO_TARGET",
    "TYPE_REASONING",
    "TYPE_REFERRING",
    "DatasetFormatError",
    "ExpressionRecord",
    "MissingMaskEntryError",
    "VideoInfo",
]
