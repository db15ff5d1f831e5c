"""ReVOS reader: the mask-dictionary format that MeViS shares (docs/method.md section 2).

Layout under the root (a local folder or s3://bucket/prefix)::

    JPEGImages/<video>/<frame>.jpg          video names may contain "/" (e.g. "OVIS/train/00e92ab4")
    meta_expressions_<split>_.json          {"videos": {video: {"vid_id", "height", "width", "frames": [...],
                                              "expressions": {exp_id: {"exp", "obj_id": [int],
                                              "anno_id": [int|str], "type_id": 0|1|2}}}}}
    mask_dict.json                          {str(anno_id): [COCO RLE or null, one per frame]}
    mask_dict_foreground.json               {video: {"masks_rle": [RLE per frame]}}

An expression's ground truth on a frame is the union of its anno_ids' masks; null means absent (all False).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from veason_ray.datasets.base import (
    DatasetFormatError,
    VideoMeta,
    VOSDataset,
    format_error,
    read_json,
    require_dict,
    require_field,
    require_int,
    require_int_list,
    require_str,
    require_str_list,
)
from veason_ray.datasets.records import TYPE_NAMES, ExpressionRecord, MissingMaskEntryError, VideoInfo
from veason_ray.datasets.rle import decode_rle, union_rle_area
from veason_ray.object_store import join_uri


class ReVOSDataset(VOSDataset):
    """ReVOS: ``split`` is "train" or "valid" (any ``meta_expressions_<split>_.json`` in the root)."""

    kind = "revos"
    has_type_id: ClassVar[bool] = True  # MeViS expressions carry no type_id
    _uncached = ("_mask_dict", "_foreground_dict")

    def __init__(self, root: str, split: str = "train", storage=None):
        self._mask_dict: dict | None = None
        self._foreground_dict: dict | None = None
        super().__init__(root, split, storage)

    # --- where the files are (MeViS overrides these) -------------------------------------------------
    @property
    def meta_uri(self) -> str:
        return join_uri(self.root, f"meta_expressions_{self.split}_.json")

    @property
    def mask_dict_uri(self) -> str:
        return join_uri(self.root, "mask_dict.json")

    @property
    def foreground_uri(self) -> str | None:
        """The per-video foreground file, or None when the format has none (then: union of all objects)."""
        return join_uri(self.root, "mask_dict_foreground.json")

    @property
    def image_root(self) -> str:
        return join_uri(self.root, "JPEGImages")

    # --- expression file ------------------------------------------------------------------------------
    def _parse_meta(self) -> dict[str, VideoMeta]:
        file = self.meta_uri
        doc = require_dict(read_json(self.store, file), file, "(root)")
        videos = require_dict(require_field(doc, "videos", file, ""), file, "videos")
        out: dict[str, VideoMeta] = {}
        for name, video in videos.items():
            path = f"videos[{name!r}]"
            video = require_dict(video, file, path)
            frames = require_str_list(require_field(video, "frames", file, path), file, f"{path}.frames")
            size = [
                require_int(video[k], file, f"{path}.{k}") if k in video else None
                for k in ("height", "width")
            ]
            meta = VideoMeta(name, join_uri(self.image_root, name), frames, size[0], size[1])
            exps = require_field(video, "expressions", file, path)
            for exp_id, exp in require_dict(exps, file, f"{path}.expressions").items():
                meta.expressions.append(
                    self._parse_expression(name, str(exp_id), exp, f"{path}.expressions[{exp_id!r}]")
                )
            out[name] = meta
        return out

    def _parse_expression(self, video: str, exp_id: str, exp: Any, path: str) -> ExpressionRecord:
        file = self.meta_uri
        exp = require_dict(exp, file, path)
        text = require_str(require_field(exp, "exp", file, path), file, f"{path}.exp")
        obj_ids = require_int_list(require_field(exp, "obj_id", file, path), file, f"{path}.obj_id")
        anno_ids = require_field(exp, "anno_id", file, path)
        if not isinstance(anno_ids, list) or not all(
            isinstance(a, str) or (isinstance(a, int) and not isinstance(a, bool)) for a in anno_ids
        ):
            raise format_error(file, f"{path}.anno_id", "list of int or str", anno_ids)
        if len(anno_ids) != len(obj_ids):
            raise DatasetFormatError(
                f"{file}: {path}.anno_id: expected one anno_id per obj_id ({len(obj_ids)}), got {len(anno_ids)}"
            )
        type_id = None
        if self.has_type_id:
            type_id = require_int(require_field(exp, "type_id", file, path), file, f"{path}.type_id")
            if type_id not in TYPE_NAMES:
                raise DatasetFormatError(f"{file}: {path}.type_id: expected 0, 1 or 2, got {type_id}")
        return ExpressionRecord(
            dataset=self.kind,
            split=self.split,
            video=video,
            exp_id=exp_id,
            expression=text,
            type_id=type_id,
            obj_ids=obj_ids,
            anno_ids=tuple(str(a) for a in anno_ids),
        )

    # --- masks ----------------------------------------------------------------------------------------
    def _load(self, attr: str, uri: str) -> dict:
        with self._lock:
            if getattr(self, attr) is None:
                setattr(self, attr, require_dict(read_json(self.store, uri), uri, "(root)"))
            return getattr(self, attr)

    def _check_frame_list(self, rles: Any, info: VideoInfo, file: str, path: str) -> None:
        if not isinstance(rles, list) or len(rles) != info.num_frames:
            got = f"list of {len(rles)}" if isinstance(rles, list) else type(rles).__name__
            raise DatasetFormatError(
                f"{file}: {path}: expected a list of {info.num_frames} RLE or null "
                f"(one per frame of video {info.name!r}), got {got}"
            )

    def _decode_frames(
        self, rles: Any, info: VideoInfo, frame_indices: list[int], file: str, path: str
    ) -> np.ndarray:
        """Decode a per-frame list of RLE-or-null at the requested frames."""
        self._check_frame_list(rles, info, file, path)
        out = np.zeros((len(frame_indices), info.height, info.width), dtype=bool)
        for t, i in enumerate(frame_indices):
            if rles[i] is None:
                continue
            mask = decode_rle(rles[i], f"{file}: {path}[{i}]")
            if mask.shape != out.shape[1:]:
                raise DatasetFormatError(
                    f"{file}: {path}[{i}].size: expected [{info.height}, {info.width}] "
                    f"(the size of video {info.name!r}), got {list(mask.shape)}"
                )
            out[t] = mask
        return out

    def _annotation_rles(self, info: VideoInfo, anno_id: str) -> list:
        """The per-frame RLE-or-null list of one annotation id, checked for length."""
        masks = self._load("_mask_dict", self.mask_dict_uri)
        if anno_id not in masks:
            raise MissingMaskEntryError(
                f"{self.mask_dict_uri}: [{anno_id!r}]: missing (an anno_id of video {info.name!r} in {self.meta_uri})"
            )
        self._check_frame_list(masks[anno_id], info, self.mask_dict_uri, f"[{anno_id!r}]")
        return masks[anno_id]

    def _annotation_masks(self, info: VideoInfo, anno_id: str, frame_indices: list[int]) -> np.ndarray:
        rles = self._annotation_rles(info, anno_id)
        return self._decode_frames(rles, info, frame_indices, self.mask_dict_uri, f"[{anno_id!r}]")

    def gt_areas(self, expr: ExpressionRecord) -> np.ndarray:
        """(L,) int64 GT union area of every frame, from the RLEs (pycocotools merge): no mask is decoded."""
        info = self.video(expr.video)
        entries = [self._annotation_rles(info, a) for a in expr.anno_ids]
        areas = np.zeros(info.num_frames, np.int64)
        for t in range(info.num_frames):
            present = [rles[t] for rles in entries if rles[t] is not None]
            if present:
                areas[t] = union_rle_area(present, f"{self.mask_dict_uri}: frame {t} of {expr.key}")
        return areas

    def _foreground_masks(self, info: VideoInfo, frame_indices: list[int]) -> np.ndarray:
        uri = self.foreground_uri
        with self._lock:
            if self._foreground_dict is None and (uri is None or not self.store.exists(uri)):
                self._foreground_dict = {}  # no file: foreground is the union of all annotated objects
        if not self._load("_foreground_dict", uri):
            return super()._foreground_masks(info, frame_indices)
        fg = self._foreground_dict
        path = f"[{info.name!r}]"
        if info.name not in fg:
            raise DatasetFormatError(f"{uri}: {path}: missing (a video of {self.meta_uri})")
        entry = require_dict(fg[info.name], uri, path)
        rles = require_field(entry, "masks_rle", uri, path)
        return self._decode_frames(rles, info, frame_indices, uri, f"{path}.masks_rle")
