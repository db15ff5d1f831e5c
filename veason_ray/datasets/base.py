"""The reader interface shared by ReVOS, MeViS and ReasonVOS, plus JSON validation helpers.

A reader parses and validates the dataset's expression file when opened, then decodes frames and masks on
demand through the :class:`~veason_ray.object_store.ObjectStore` of its root (a local folder or s3://). Large
JSON mask files are parsed once per reader, on first use, and never pickled with it: a reader shipped to a
worker process re-reads them there.
"""

from __future__ import annotations

import abc
import io
import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import cv2
import numpy as np
from PIL import Image

from veason_ray.config import StorageConfig
from veason_ray.datasets.records import DatasetFormatError, ExpressionRecord, VideoInfo
from veason_ray.datasets.rle import union_masks
from veason_ray.object_store import ObjectStore, join_uri, store_for

FRAME_EXT = ".jpg"


def _kind_of(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def format_error(file: str, path: str, expected: str, value: Any) -> DatasetFormatError:
    """``"<file>: <path>: expected <expected>, got <type>"``."""
    return DatasetFormatError(f"{file}: {path}: expected {expected}, got {_kind_of(value)}")


def read_json(store: ObjectStore, uri: str) -> Any:
    """Parse a JSON file; DatasetFormatError naming the file when it is not valid JSON."""
    data = store.read_bytes(uri)
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetFormatError(f"{uri}: not valid JSON ({e})") from None


def require_field(obj: dict, key: str, file: str, path: str) -> Any:
    """``obj[key]``; DatasetFormatError naming ``<path>.<key>`` when absent (``path`` "" for the root)."""
    if key not in obj:
        raise DatasetFormatError(f"{file}: {f'{path}.{key}' if path else key}: missing")
    return obj[key]


def require_dict(value: Any, file: str, path: str) -> dict:
    if not isinstance(value, dict):
        raise format_error(file, path, "object", value)
    return value


def require_list(value: Any, file: str, path: str) -> list:
    if not isinstance(value, list):
        raise format_error(file, path, "list", value)
    return value


def require_str(value: Any, file: str, path: str) -> str:
    if not isinstance(value, str):
        raise format_error(file, path, "str", value)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def require_int(value: Any, file: str, path: str) -> int:
    if not _is_int(value):
        raise format_error(file, path, "int", value)
    return value


def require_int_list(value: Any, file: str, path: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(_is_int(v) for v in value):
        raise format_error(file, path, "list of int", value)
    return tuple(value)


def require_str_list(value: Any, file: str, path: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise format_error(file, path, "list of str", value)
    return tuple(value)


@dataclass
class VideoMeta:
    """What a reader knows about a video after parsing its expression file. ``frames`` None: list the frame
    folder; ``height``/``width`` None: read them from the first frame."""

    name: str
    frame_dir: str
    frames: tuple[str, ...] | None
    height: int | None
    width: int | None
    expressions: list[ExpressionRecord] = field(default_factory=list)


class VOSDataset(abc.ABC):
    """One split of a video object segmentation dataset with referring expressions.

    Frame indices are positions in the video's frame list (0-based). Masks are boolean arrays at the original
    frame size: ``gt_masks`` (T, H, W) is the union of an expression's targets, ``object_masks`` (K, T, H, W)
    one per target object (K = len(obj_ids), in obj_ids order), ``foreground`` (T, H, W) all annotated
    objects of the video.
    """

    kind: ClassVar[str]
    _uncached: ClassVar[tuple[str, ...]] = ()  # attributes dropped when pickled (large, re-read lazily)

    def __init__(self, root: str, split: str, storage: StorageConfig | None = None):
        self.root = str(root).rstrip("/")
        self.split = split
        self.storage = storage
        self.store = store_for(self.root, storage)
        self._lock = threading.RLock()
        self._infos: dict[str, VideoInfo] = {}
        self._meta: dict[str, VideoMeta] = self._parse_meta()

    # --- what each format supplies -------------------------------------------------------------------
    @abc.abstractmethod
    def _parse_meta(self) -> dict[str, VideoMeta]:
        """Read and validate the expression file(s)."""

    @abc.abstractmethod
    def _annotation_masks(self, info: VideoInfo, anno_id: str, frame_indices: list[int]) -> np.ndarray:
        """(T, H, W) bool masks of one annotated object at the given frames."""

    def _foreground_masks(self, info: VideoInfo, frame_indices: list[int]) -> np.ndarray:
        """Default: the union of every object any expression of the video refers to."""
        anno_ids = dict.fromkeys(a for e in self._meta[info.name].expressions for a in e.anno_ids)
        shape = (len(frame_indices), info.height, info.width)
        return union_masks((self._annotation_masks(info, a, frame_indices) for a in anno_ids), shape)

    # --- pickling: drop the large lazily-loaded caches -----------------------------------------------
    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in self._uncached and k != "_lock"}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.update(dict.fromkeys(self._uncached))
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={self.root!r}, split={self.split!r}, videos={len(self._meta)})"

    # --- videos and expressions ----------------------------------------------------------------------
    @property
    def video_names(self) -> list[str]:
        return list(self._meta)

    def video(self, name: str) -> VideoInfo:
        """The video's frames and size (may read the frame folder or first frame when the file lacks them)."""
        with self._lock:
            if name not in self._infos:
                if name not in self._meta:
                    raise KeyError(f"{self.root}: no video {name!r} in split {self.split!r}")
                self._infos[name] = self._build_info(self._meta[name])
            return self._infos[name]

    @property
    def videos(self) -> dict[str, VideoInfo]:
        """Every video's :class:`VideoInfo` (builds them all: may read one frame per video without a size)."""
        return {name: self.video(name) for name in self._meta}

    def expressions(self) -> Iterator[ExpressionRecord]:
        """Every expression of the split, in file order."""
        for meta in self._meta.values():
            yield from meta.expressions

    def expressions_of(self, video: str) -> list[ExpressionRecord]:
        return list(self._meta[video].expressions)

    def expression(self, video: str, exp_id: str) -> ExpressionRecord:
        for e in self._meta[video].expressions:
            if e.exp_id == str(exp_id):
                return e
        raise KeyError(f"{self.root}: no expression {exp_id!r} for video {video!r}")

    def __len__(self) -> int:
        return sum(len(m.expressions) for m in self._meta.values())

    def _build_info(self, meta: VideoMeta) -> VideoInfo:
        frames = meta.frames
        if frames is None:
            listed = self.store.list_files(meta.frame_dir)
            frames = tuple(
                uri.rsplit("/", 1)[-1][: -len(FRAME_EXT)] for uri in listed if uri.endswith(FRAME_EXT)
            )
            if not frames:
                raise DatasetFormatError(f"{meta.frame_dir}: no {FRAME_EXT} frames for video {meta.name!r}")
        uris = tuple(join_uri(meta.frame_dir, f + FRAME_EXT) for f in frames)
        height, width = meta.height, meta.width
        if height is None or width is None:
            with self.store.open_input(uris[0]) as f:
                width, height = Image.open(io.BytesIO(f.read())).size
        return VideoInfo(meta.name, int(height), int(width), tuple(frames), uris)

    # --- frames ---------------------------------------------------------------------------------------
    def _indices(self, info: VideoInfo, frame_indices: Sequence[int] | None) -> list[int]:
        if frame_indices is None:
            return list(range(info.num_frames))
        out = [int(i) for i in frame_indices]
        for i in out:
            if not 0 <= i < info.num_frames:
                raise IndexError(f"video {info.name!r}: frame index {i} out of range [0, {info.num_frames})")
        return out

    def frame_uri(self, video: str, frame_index: int) -> str:
        info = self.video(video)
        return info.frame_uris[self._indices(info, [frame_index])[0]]

    def read_frame(self, video: str, frame_index: int) -> np.ndarray:
        """The frame as (H, W, 3) uint8 RGB."""
        info = self.video(video)
        uri = self.frame_uri(video, frame_index)
        image = cv2.imdecode(np.frombuffer(self.store.read_bytes(uri), np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise DatasetFormatError(f"{uri}: not a decodable image")
        if image.shape[:2] != (info.height, info.width):
            raise DatasetFormatError(
                f"{uri}: frame is {image.shape[1]}x{image.shape[0]}, the video's size is {info.width}x{info.height}"
            )
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def read_frames(self, video: str, frame_indices: Sequence[int] | None = None) -> np.ndarray:
        """(T, H, W, 3) uint8 RGB."""
        info = self.video(video)
        return np.stack([self.read_frame(video, i) for i in self._indices(info, frame_indices)])

    # --- masks ----------------------------------------------------------------------------------------
    def object_masks(self, expr: ExpressionRecord, frame_indices: Sequence[int] | None = None) -> np.ndarray:
        """(K, T, H, W) bool, one mask stack per target object (K may be 0); absent objects are all False."""
        info = self.video(expr.video)
        idx = self._indices(info, frame_indices)
        stacks = [self._annotation_masks(info, a, idx) for a in expr.anno_ids]
        if not stacks:
            return np.zeros((0, len(idx), info.height, info.width), dtype=bool)
        return np.stack(stacks)

    def gt_masks(self, expr: ExpressionRecord, frame_indices: Sequence[int] | None = None) -> np.ndarray:
        """(T, H, W) bool: the union of the expression's targets (all False for no target)."""
        info = self.video(expr.video)
        idx = self._indices(info, frame_indices)
        shape = (len(idx), info.height, info.width)
        return union_masks((self._annotation_masks(info, a, idx) for a in expr.anno_ids), shape)

    def gt_areas(self, expr: ExpressionRecord) -> np.ndarray:
        """(L,) int64 pixel area of the GT union mask on every frame of the video (original resolution); the
        training keyframe draw needs only these. Formats that store RLEs compute them without decoding."""
        info = self.video(expr.video)
        return self.gt_masks(expr).reshape(info.num_frames, -1).sum(axis=1).astype(np.int64)

    def foreground(self, video: str, frame_indices: Sequence[int] | None = None) -> np.ndarray:
        """(T, H, W) bool: every annotated object of the video (used by the robustness metric R)."""
        info = self.video(video)
        return self._foreground_masks(info, self._indices(info, frame_indices))
