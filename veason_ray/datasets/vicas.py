"""ViCaS reader: the language-guided video instance segmentation (LG-VIS) prompts of ViCaS, one JSON file per
video with COCO RLE masks per object track and frame (docs/method.md section 2).

Layout under the root (the release's ``$VICAS_DIR``; a local folder or s3://bucket/prefix)::

    video_frames/<video_id:06d>/<frame>.jpg      the videos decoded at 30 fps (`ffmpeg -r 30 ... %05d.jpg`)
    annotations/<version>/<video_id:06d>.json    one file per video (the older `<video_id:06d>_<name>.json` too)
    splits/<version>/{train,val,test}.json       a JSON list of int video ids

The fields of an annotation file we read (the captions are not)::

    {"video_id": int, "image_size": [height, width],
     "segmentations": [{"filename": "<frame>.jpg", "is_gt": bool, "track_ids": [int], "mask_rles": [RLE]}, ...],
     "object_referrals": [{"prompt": str, "track_ids": [int]}, ...]}

One expression per LG-VIS prompt: exp_id is its position in ``object_referrals`` (the official evaluation pairs
predictions with prompts by position), obj_ids its track ids (anno_ids the same, as str). A video's frames are
the frames ``segmentations`` annotates, in name order; a track missing from a frame's ``track_ids`` is absent
there. ``is_gt`` marks the human-annotated frames (about one a second; SAM2 filled in the others): ViCaS scores
those only (:meth:`ViCaSDataset.benchmark_frames`). ViCaS has no expression types (type_id None).

``split``: "val", "test" or "train" ("valid" reads "val") from the newest version under ``splits/``, or
"<version>/<split>" (e.g. "v0.1/val"). Opening a split reads every annotation file of it. Entries that cannot be
used are left out then and counted by reason (:attr:`ViCaSDataset.skipped`, each logged with the file and field):
a video without its annotation file or its frames, an annotation file that breaks the schema, a prompt with no
object, one naming a track that has no mask, one whose track has a malformed RLE (size or type; a corrupt
``counts`` string is found when decoded, and the pipelines count it then).
"""

from __future__ import annotations

import logging
import re
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from veason_ray.datasets.base import (
    FRAME_EXT,
    DatasetFormatError,
    VideoMeta,
    VOSDataset,
    format_error,
    read_json,
    require_dict,
    require_field,
    require_int,
    require_int_list,
    require_list,
    require_str,
)
from veason_ray.datasets.records import ExpressionRecord, MissingMaskEntryError, VideoInfo
from veason_ray.datasets.rle import decode_rle
from veason_ray.object_store import join_uri

log = logging.getLogger(__name__)

SPLIT_ALIASES = {"valid": "val"}  # data.eval_split's default names ViCaS's val split
RELEASE_HINT = (
    "the ViCaS release: github.com/Ali2500/ViCaS, annotations at huggingface.co/datasets/Ali2500/ViCaS"
)
READ_THREADS = 8  # annotation files read at once when a split is opened (object storage latency)
CACHED_VIDEOS = 4  # videos whose masks are kept parsed (a pipeline stage works on one video at a time)

# why an entry was left out (short metric names, as the pipelines' skip reasons)
MISSING_ANNOTATION = "missing_annotation"  # a video of the split file without its annotation file
MISSING_VIDEO = "missing_video"  # a video whose first frame is not in video_frames/
MALFORMED_ANNOTATION = "malformed_annotation"  # a file or prompt that breaks the schema
NO_OBJECTS = "no_objects"  # a prompt with an empty track_ids list
UNKNOWN_TRACK = "unknown_track"  # a prompt naming a track with no mask on any frame
INVALID_RLE = "invalid_rle"  # a prompt whose track has an RLE that is not {size: [H, W], counts: str or list}


@dataclass(frozen=True)
class SkippedEntry:
    """A video (exp_id None) or one of its prompts that the reader left out, why (``reason``), and where."""

    reason: str
    video: str
    exp_id: str | None
    detail: str


@dataclass
class _Segmentations:
    """An annotation file's ``segmentations``, frames in name order: frame names (no extension), the indices of
    the human-annotated ones, per track its (RLE, JSON path) on every frame (None where absent), and the tracks
    with a malformed RLE (the first problem of each)."""

    frames: tuple[str, ...]
    benchmark: tuple[int, ...]
    tracks: dict[int, list[tuple[dict, str] | None]]
    bad_tracks: dict[int, str]


@dataclass
class _ParsedVideo:
    meta: VideoMeta | None
    benchmark: tuple[int, ...] = ()
    skipped: list[SkippedEntry] = field(default_factory=list)


def _image_size(doc: dict, file: str) -> tuple[int, int]:
    size = require_field(doc, "image_size", file, "")
    if not (isinstance(size, list) and len(size) == 2):
        raise format_error(file, "image_size", "[height, width]", size)
    height, width = (require_int(v, file, f"image_size[{i}]") for i, v in enumerate(size))
    return height, width


def _rle_problem(rle: Any, where: str, height: int, width: int) -> str | None:
    """What is wrong with an RLE's form (its counts string is checked when decoded), or None."""
    if not isinstance(rle, dict) or "counts" not in rle:
        return f"{where}: expected an RLE object {{size, counts}}, got {rle!r:.60}"
    if rle.get("size") != [height, width]:
        return f"{where}.size: expected [{height}, {width}] (the file's image_size), got {rle.get('size')!r}"
    if not isinstance(rle["counts"], (str, list)):
        return f"{where}.counts: expected a str or a list of int, got {type(rle['counts']).__name__}"
    return None


def _parse_segmentations(doc: dict, file: str, height: int, width: int) -> _Segmentations:
    """The ``segmentations`` of an annotation file, checked; DatasetFormatError naming the file and field."""
    entries = require_list(require_field(doc, "segmentations", file, ""), file, "segmentations")
    rows = []
    for k, entry in enumerate(entries):
        path = f"segmentations[{k}]"
        entry = require_dict(entry, file, path)
        name = require_str(require_field(entry, "filename", file, path), file, f"{path}.filename")
        if not name.endswith(FRAME_EXT) or "/" in name:
            raise DatasetFormatError(
                f"{file}: {path}.filename: expected a frame file such as '00000.jpg', got {name!r}"
            )
        is_gt = require_field(entry, "is_gt", file, path)
        if not isinstance(is_gt, bool):
            raise format_error(file, f"{path}.is_gt", "bool", is_gt)
        track_ids = require_int_list(require_field(entry, "track_ids", file, path), file, f"{path}.track_ids")
        rles = require_list(require_field(entry, "mask_rles", file, path), file, f"{path}.mask_rles")
        if len(rles) != len(track_ids) or len(set(track_ids)) != len(track_ids):
            raise DatasetFormatError(
                f"{file}: {path}: expected one mask_rles entry per distinct track id, got track_ids "
                f"{list(track_ids)} and {len(rles)} mask_rles"
            )
        rows.append((name[: -len(FRAME_EXT)], is_gt, track_ids, rles, path))
    rows.sort(key=lambda row: row[0])
    frames = tuple(row[0] for row in rows)
    if not frames or len(set(frames)) != len(frames):
        raise DatasetFormatError(
            f"{file}: segmentations: expected one entry per annotated frame, got {len(rows)}"
        )
    tracks: dict[int, list[tuple[dict, str] | None]] = {}
    bad_tracks: dict[int, str] = {}
    for t, (_, _, track_ids, rles, path) in enumerate(rows):
        for j, (track, rle) in enumerate(zip(track_ids, rles, strict=True)):
            where = f"{file}: {path}.mask_rles[{j}]"
            problem = _rle_problem(rle, where, height, width)
            if problem:
                bad_tracks.setdefault(track, problem)
            tracks.setdefault(track, [None] * len(rows))[t] = (rle, where)
    benchmark = tuple(t for t, row in enumerate(rows) if row[1])
    if not benchmark:
        raise DatasetFormatError(
            f"{file}: segmentations: no frame with is_gt true (ViCaS scores those frames)"
        )
    return _Segmentations(frames, benchmark, tracks, bad_tracks)


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", version))


class ViCaSDataset(VOSDataset):
    """ViCaS's LG-VIS prompts of one split ("val", "test", "train"; "<version>/<split>" for an older release)."""

    kind = "vicas"
    _uncached = ("_tracks",)

    def __init__(self, root: str, split: str = "val", storage=None):
        self._tracks: OrderedDict[str, dict] | None = None  # video -> _parse_segmentations(...).tracks
        self._benchmark: dict[str, tuple[int, ...]] = {}
        self._annotation_uris: dict[str, str] = {}
        self.version = ""
        self.skipped: list[SkippedEntry] = []
        super().__init__(root, split, storage)

    @property
    def skipped_counts(self) -> dict[str, int]:
        """How many videos or prompts were left out, by reason."""
        return dict(sorted(Counter(s.reason for s in self.skipped).items()))

    def benchmark_frames(self, video: str) -> tuple[int, ...]:
        """Indices of the video's human-annotated frames (``is_gt``): the frames ViCaS's benchmark scores."""
        return self._benchmark[video]

    # --- which files ----------------------------------------------------------------------------------
    def _split_file(self) -> str:
        """The split file's URI; sets ``version`` (named in the split, else the newest under ``splits/``)."""
        version, _, name = self.split.rpartition("/")
        name = SPLIT_ALIASES.get(name, name)
        splits = join_uri(self.root, "splits")
        if not version:
            versions = {
                uri[len(splits) + 1 :].rsplit("/", 1)[0]
                for uri in self.store.list_files(splits)
                if uri.endswith(f"/{name}.json") and uri.count("/") == splits.count("/") + 2
            }
            if not versions:
                raise DatasetFormatError(
                    f"{splits}: no <version>/{name}.json for split {self.split!r}; copy the splits/ folder of "
                    f"{RELEASE_HINT} under the root (splits: train, val, test)"
                )
            version = max(versions, key=_version_key)
        self.version = version
        return join_uri(splits, version, f"{name}.json")

    def _split_ids(self, uri: str) -> list[int]:
        if not self.store.exists(uri):
            raise DatasetFormatError(
                f"{uri}: missing; copy the splits/ folder of {RELEASE_HINT} under the root"
            )
        ids = read_json(self.store, uri)
        if not isinstance(ids, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in ids):
            raise format_error(uri, "(root)", "a list of int video ids", ids)
        return sorted(set(ids))

    def _annotation_files(self) -> dict[int, str]:
        """{video id: annotation file} from one listing of ``annotations/<version>/``."""
        folder = join_uri(self.root, "annotations", self.version)
        files: dict[int, str] = {}
        for uri in self.store.list_files(folder):
            stem = uri.rsplit("/", 1)[-1].removesuffix(".json")
            number, exact = stem.split("_", 1)[0], "_" not in stem
            if uri.endswith(".json") and number.isdigit() and (exact or int(number) not in files):
                files[int(number)] = uri
        if not files:
            raise DatasetFormatError(
                f"{folder}: no annotation files (<video_id>.json); put the annotations/{self.version}/ folder "
                f"of {RELEASE_HINT} under the root"
            )
        return files

    # --- the split's prompts --------------------------------------------------------------------------
    def _parse_meta(self) -> dict[str, VideoMeta]:
        split_uri = self._split_file()
        video_ids = self._split_ids(split_uri)
        files = self._annotation_files()
        with ThreadPoolExecutor(READ_THREADS) as pool:
            parsed = list(pool.map(lambda v: self._parse_video(v, files.get(v), split_uri), video_ids))
        out: dict[str, VideoMeta] = {}
        for video_id, entry in zip(video_ids, parsed, strict=True):
            self.skipped.extend(entry.skipped)
            if entry.meta is not None:
                out[entry.meta.name] = entry.meta
                self._benchmark[entry.meta.name] = entry.benchmark
                self._annotation_uris[entry.meta.name] = files[video_id]
        for s in self.skipped:
            log.warning(
                "vicas %s: skipped %s (%s): %s",
                self.split,
                f"{s.video}/{s.exp_id or '*'}",
                s.reason,
                s.detail,
            )
        if video_ids and not out:
            raise DatasetFormatError(
                f"{split_uri}: none of its {len(video_ids)} videos has a usable LG-VIS prompt "
                f"(left out: {self.skipped_counts}); see the warnings above"
            )
        return out

    def _parse_video(self, video_id: int, uri: str | None, split_uri: str) -> _ParsedVideo:
        name = f"{video_id:06d}"
        if uri is None:
            detail = f"{split_uri}: video {video_id} has no annotations/{self.version}/{name}.json"
            return _ParsedVideo(None, skipped=[SkippedEntry(MISSING_ANNOTATION, name, None, detail)])
        try:
            doc = require_dict(read_json(self.store, uri), uri, "(root)")
            if require_int(require_field(doc, "video_id", uri, ""), uri, "video_id") != video_id:
                raise DatasetFormatError(
                    f"{uri}: video_id: expected {video_id} (the file's name), got {doc['video_id']}"
                )
            height, width = _image_size(doc, uri)
            segmentations = _parse_segmentations(doc, uri, height, width)
            referrals = require_list(require_field(doc, "object_referrals", uri, ""), uri, "object_referrals")
        except DatasetFormatError as error:
            return _ParsedVideo(None, skipped=[SkippedEntry(MALFORMED_ANNOTATION, name, None, str(error))])
        meta = VideoMeta(name, join_uri(self.root, "video_frames", name), segmentations.frames, height, width)
        parsed = _ParsedVideo(meta, segmentations.benchmark)
        for index, referral in enumerate(referrals):
            record = self._parse_referral(name, uri, index, referral, segmentations)
            if isinstance(record, SkippedEntry):
                parsed.skipped.append(record)
            else:
                meta.expressions.append(record)
        if not meta.expressions:
            parsed.meta = None
            return parsed
        first = join_uri(meta.frame_dir, segmentations.frames[0] + FRAME_EXT)
        if not self.store.exists(first):
            detail = (
                f"{first}: not found (the first frame of video {name}; decode its video into video_frames/)"
            )
            return _ParsedVideo(None, skipped=[SkippedEntry(MISSING_VIDEO, name, None, detail)])
        return parsed

    def _parse_referral(
        self, video: str, file: str, index: int, referral: Any, segmentations: _Segmentations
    ) -> ExpressionRecord | SkippedEntry:
        path = f"object_referrals[{index}]"
        try:
            referral = require_dict(referral, file, path)
            prompt = require_str(require_field(referral, "prompt", file, path), file, f"{path}.prompt")
            tracks = require_int_list(
                require_field(referral, "track_ids", file, path), file, f"{path}.track_ids"
            )
        except DatasetFormatError as error:
            return SkippedEntry(MALFORMED_ANNOTATION, video, str(index), str(error))
        unknown = [t for t in tracks if t not in segmentations.tracks]
        invalid = [segmentations.bad_tracks[t] for t in tracks if t in segmentations.bad_tracks]
        if not tracks:
            detail = f"{file}: {path}.track_ids: empty (the prompt {prompt!r} refers to no object)"
            return SkippedEntry(NO_OBJECTS, video, str(index), detail)
        if unknown:
            detail = f"{file}: {path}.track_ids: track(s) {unknown} have no mask on any frame"
            return SkippedEntry(UNKNOWN_TRACK, video, str(index), detail)
        if invalid:
            return SkippedEntry(INVALID_RLE, video, str(index), invalid[0])
        return ExpressionRecord(
            dataset=self.kind,
            split=self.split,
            video=video,
            exp_id=str(index),
            expression=prompt,
            type_id=None,
            obj_ids=tracks,
            anno_ids=tuple(str(t) for t in tracks),
        )

    # --- masks ----------------------------------------------------------------------------------------
    def _track_rles(self, video: str) -> dict[int, list[tuple[dict, str] | None]]:
        """Per track of the video, its (RLE, JSON path) on every frame; the annotation file is read again (a few
        videos are kept: reading the split keeps only its prompts)."""
        with self._lock:
            if self._tracks is None:
                self._tracks = OrderedDict()
            if video in self._tracks:
                self._tracks.move_to_end(video)
                return self._tracks[video]
        uri = self._annotation_uris[video]
        doc = require_dict(read_json(self.store, uri), uri, "(root)")
        tracks = _parse_segmentations(doc, uri, *_image_size(doc, uri)).tracks
        with self._lock:
            self._tracks[video] = tracks
            while len(self._tracks) > CACHED_VIDEOS:
                self._tracks.popitem(last=False)
        return tracks

    def _annotation_masks(self, info: VideoInfo, anno_id: str, frame_indices: list[int]) -> np.ndarray:
        rles = self._track_rles(info.name).get(int(anno_id))
        if rles is None:
            raise MissingMaskEntryError(
                f"{self._annotation_uris[info.name]}: track {anno_id}: no mask on any frame (video {info.name!r})"
            )
        out = np.zeros((len(frame_indices), info.height, info.width), dtype=bool)
        for t, i in enumerate(frame_indices):
            if rles[i] is not None:
                out[t] = decode_rle(*rles[i])
        return out
