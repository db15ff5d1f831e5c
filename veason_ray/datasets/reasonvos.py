"""ReasonVOS reader: one PNG per frame and annotated object, expressions as a list per video.

Layout under the root (a local folder or s3://bucket/prefix)::

    JPEGImages/<video>/<frame>.jpg
    Annotations/<source>_<video>_<obj_id>/<frame>.png      grayscale, 0 background / 255 object
    meta_expressions.json     {"videos": {video: {"source": str, "frames": [...] (optional),
                                "expressions": [{"obj_id", "exp_id", "exp_text", "is_sent"}, ...]}}}

Tolerated variants seen in released copies: ``meta_expressions_.json`` as the file name, ``expressions`` as an
object keyed by exp_id, ``is_sent`` or ``source`` on the video instead of each expression, ``obj_id`` as an
int, a numeric string or a list of ints (one annotation folder per id), the source's case differing from the
folder name's. A frame without a PNG in the object's folder is a frame where the object is absent. ReasonVOS
has no type_id; ``is_sent`` is kept on the record.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from veason_ray.datasets.base import (
    DatasetFormatError,
    VideoMeta,
    VOSDataset,
    format_error,
    read_json,
    require_dict,
    require_field,
    require_str,
    require_str_list,
)
from veason_ray.datasets.records import ExpressionRecord, VideoInfo
from veason_ray.object_store import join_uri

META_FILE = "meta_expressions.json"
META_FILE_RELEASE = "meta_expressions_.json"  # the name used by the Veason-R1 release


def annotation_folder(source: str, video: str, obj_id: int) -> str:
    """The folder name of one object's masks: ``<source>_<video>_<obj_id>``."""
    return f"{source}_{video}_{obj_id}"


def _parse_obj_ids(value: Any, file: str, path: str) -> tuple[int, ...]:
    items = value if isinstance(value, list) else [value]
    out = []
    for v in items:
        if isinstance(v, int) and not isinstance(v, bool):
            out.append(v)
        elif isinstance(v, str) and v.strip().lstrip("-").isdigit():
            out.append(int(v))
        else:
            raise format_error(file, path, "int, numeric str or list of int", value)
    if not out:
        raise DatasetFormatError(f"{file}: {path}: expected at least one object id, got an empty list")
    return tuple(out)


def _parse_is_sent(value: Any, file: str, path: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if value in (0, 1) and isinstance(value, int):
        return bool(value)
    raise format_error(file, path, "bool", value)


class ReasonVOSDataset(VOSDataset):
    """ReasonVOS (a single evaluation split; ``split`` only labels the records)."""

    kind = "reasonvos"
    _uncached = ("_annotations",)

    def __init__(self, root: str, split: str = "valid", storage=None):
        self._annotations: dict[str, dict[str, str]] | None = None
        self._folder_candidates: dict[str, tuple[str, ...]] = {}
        self._meta_uri: str | None = None
        super().__init__(root, split, storage)

    @property
    def meta_uri(self) -> str:
        if self._meta_uri is None:
            self._meta_uri = join_uri(self.root, META_FILE)
            release = join_uri(self.root, META_FILE_RELEASE)
            if not self.store.exists(self._meta_uri) and self.store.exists(release):
                self._meta_uri = release
        return self._meta_uri

    @property
    def image_root(self) -> str:
        return join_uri(self.root, "JPEGImages")

    @property
    def annotations_root(self) -> str:
        return join_uri(self.root, "Annotations")

    def _parse_meta(self) -> dict[str, VideoMeta]:
        file = self.meta_uri
        doc = require_dict(read_json(self.store, file), file, "(root)")
        videos = require_dict(require_field(doc, "videos", file, ""), file, "videos")
        out: dict[str, VideoMeta] = {}
        for name, video in videos.items():
            path = f"videos[{name!r}]"
            video = require_dict(video, file, path)
            frames = None
            if "frames" in video:
                frames = require_str_list(video["frames"], file, f"{path}.frames")
            meta = VideoMeta(name, join_uri(self.image_root, name), frames, None, None)
            exps = require_field(video, "expressions", file, path)
            if isinstance(exps, list):
                items = list(enumerate(exps))
            elif isinstance(exps, dict):
                items = list(exps.items())
            else:
                raise format_error(file, f"{path}.expressions", "list of expressions", exps)
            for key, exp in items:
                meta.expressions.append(self._parse_expression(name, video, path, key, exp))
            out[name] = meta
        return out

    def _parse_expression(self, name: str, video: dict, vpath: str, key: Any, exp: Any) -> ExpressionRecord:
        file, path = self.meta_uri, f"{vpath}.expressions[{key!r}]"
        exp = require_dict(exp, file, path)
        text = require_str(require_field(exp, "exp_text", file, path), file, f"{path}.exp_text")
        obj_ids = _parse_obj_ids(require_field(exp, "obj_id", file, path), file, f"{path}.obj_id")
        is_sent = _parse_is_sent(exp.get("is_sent", video.get("is_sent")), file, f"{path}.is_sent")
        if "source" in exp:
            source = require_str(exp["source"], file, f"{path}.source")
        else:
            source = require_str(require_field(video, "source", file, vpath), file, f"{vpath}.source")
        anno_ids = tuple(annotation_folder(source, name, o) for o in obj_ids)
        for anno_id, o in zip(anno_ids, obj_ids, strict=True):
            self._folder_candidates[anno_id] = (anno_id, annotation_folder(source.lower(), name, o))
        return ExpressionRecord(
            dataset=self.kind,
            split=self.split,
            video=name,
            exp_id=str(exp.get("exp_id", key)),
            expression=text,
            type_id=None,
            obj_ids=obj_ids,
            anno_ids=anno_ids,
            is_sent=is_sent,
        )

    def _annotation_index(self) -> dict[str, dict[str, str]]:
        """``{folder: {frame name: PNG URI}}`` from one listing of ``Annotations/``."""
        with self._lock:
            if self._annotations is None:
                index: dict[str, dict[str, str]] = {}
                prefix = self.annotations_root.rstrip("/") + "/"
                for uri in self.store.list_files(self.annotations_root):
                    rel = uri[len(prefix) :]
                    if "/" not in rel or not rel.endswith(".png"):
                        continue
                    folder, frame = rel.rsplit("/", 1)
                    index.setdefault(folder, {})[frame[: -len(".png")]] = uri
                self._annotations = index
            return self._annotations

    def _annotation_masks(self, info: VideoInfo, anno_id: str, frame_indices: list[int]) -> np.ndarray:
        index = self._annotation_index()
        folder = next((f for f in self._folder_candidates.get(anno_id, (anno_id,)) if f in index), None)
        if folder is None:
            raise FileNotFoundError(
                f"{join_uri(self.annotations_root, anno_id)}: no annotation folder (an object of video "
                f"{info.name!r} in {self.meta_uri})"
            )
        pngs = index[folder]
        out = np.zeros((len(frame_indices), info.height, info.width), dtype=bool)
        for t, i in enumerate(frame_indices):
            uri = pngs.get(info.frame_names[i])
            if uri is None:
                continue  # no PNG: the object is not annotated (absent) on this frame
            mask = cv2.imdecode(np.frombuffer(self.store.read_bytes(uri), np.uint8), cv2.IMREAD_GRAYSCALE)
            if mask is None:
                raise DatasetFormatError(f"{uri}: not a decodable PNG")
            if mask.shape != out.shape[1:]:
                raise DatasetFormatError(
                    f"{uri}: mask is {mask.shape[1]}x{mask.shape[0]}, the video's size is {info.width}x{info.height}"
                )
            out[t] = mask > 0
        return out
