"""Write simulated videos and their expressions to disk (or s3://) in the ReVOS, ReasonVOS or ViCaS layout.

ReVOS layout (docs/method.md section 2), read back by :class:`~veason_ray.datasets.ReVOSDataset`::

    JPEGImages/synth/v0000/00000.jpg ...      JPEG quality 95; video names "synth/vNNNN" (nested, like ReVOS)
    meta_expressions_train_.json, meta_expressions_valid_.json
    mask_dict.json                            one anno_id per object (its visible pixels; null when hidden)
    mask_dict_foreground.json                 union of every object, per frame

A no-target expression (type_id 2) refers to one *phantom* object per video: an obj_id no real object has
(the number of objects) with its own anno_id whose masks are null on every frame. So every expression has a
non-empty ``obj_id`` list, every anno_id is in mask_dict.json, and the ground truth of a no-target
expression is empty on every frame.

ReasonVOS layout: ``JPEGImages/vNNNN/``, ``Annotations/synth_vNNNN_<obj_id>/<frame>.png`` (0/255, a PNG on
every frame), ``meta_expressions.json`` with the expressions as a list. ReasonVOS has no types: ``is_sent`` is
true for reasoning expressions and false for referring ones, no-target expressions are left out, and a
multi-instance expression points at one folder holding the union of its targets (obj_id 100 + k), as a
ReasonVOS annotation does.

ViCaS layout (:class:`~veason_ray.datasets.ViCaSDataset`): ``video_frames/<video_id:06d>/``,
``annotations/v1.0/<video_id:06d>.json`` per video (``image_size``; ``segmentations``: per frame its visible
tracks and their RLEs, ``is_gt`` true on every third frame as ViCaS's human-annotated frames;
``object_referrals``: one ``{prompt, track_ids}`` per expression, track id = obj id + 1; empty captions) and
``splits/v1.0/{train,val,test}.json``. The ``valid_fraction`` videos go to val and test by turns (test is empty
with one of them). ViCaS has no types and no prompt without an object: no-target expressions are left out.

Each video is simulated from its own generator seeded by (seed, index), so the same seed gives byte-identical
files and adding videos leaves the earlier ones unchanged.
"""

from __future__ import annotations

import functools
import io
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from veason_ray.config import StorageConfig, SynthConfig
from veason_ray.datasets.records import TYPE_NAMES
from veason_ray.datasets.rle import encode_mask
from veason_ray.object_store import ObjectStore, join_uri, store_for
from veason_ray.synth.expressions import NO_TARGET, REASONING, SynthExpression, generate_expressions
from veason_ray.synth.world import Scene, WorldConfig, simulate_scene

LAYOUTS = ("revos", "reasonvos", "vicas")
JPEG_QUALITY = 95
SOURCE = "synth"  # ReasonVOS "source" of every synthetic video
GROUP_ID_BASE = 100  # ReasonVOS obj_id of the k-th multi-instance target group of a video: 100 + k
VICAS_VERSION = "v1.0"  # the ViCaS release whose layout the writer follows
VICAS_HUMAN_EVERY = 3  # ViCaS layout: every third frame is "human-annotated" (is_gt), as ViCaS's 1 fps of 30
VICAS_CAPTIONS = (
    "caption_raw_en",
    "caption_parsed_en",
    "caption_raw_en_gpt",
    "caption_parsed_en_gpt",
    "caption_raw_cn",
)
_DEFAULTS = SynthConfig()


@dataclass
class SynthSummary:
    """What :func:`write_synthetic_dataset` wrote."""

    out_dir: str
    layout: str
    num_videos: int
    num_frames: int
    height: int
    width: int
    seed: int
    videos_per_split: dict[str, int] = field(default_factory=dict)
    expressions_by_type: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TYPE_NAMES.values(), 0))
    single_instance: int = 0
    multi_instance: int = 0

    @property
    def num_expressions(self) -> int:
        return sum(self.expressions_by_type.values())

    def count(self, expr: SynthExpression) -> None:
        self.expressions_by_type[TYPE_NAMES[expr.type_id]] += 1
        if len(expr.targets) > 1:
            self.multi_instance += 1
        else:
            self.single_instance += 1

    def to_text(self) -> str:
        splits = ", ".join(f"{k} {v}" for k, v in self.videos_per_split.items())
        types = ", ".join(f"{k} {v}" for k, v in self.expressions_by_type.items())
        return (
            f"wrote {self.num_videos} videos ({splits}) of {self.num_frames} frames at {self.width}x{self.height} "
            f"in the {self.layout} layout to {self.out_dir}\n"
            f"expressions: {self.num_expressions} ({types}; single-instance {self.single_instance}, "
            f"multi-instance {self.multi_instance})"
        )


def _jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _png(mask: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", mask.astype(np.uint8) * 255)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return data.tobytes()


def _json(doc: dict | list) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _valid_videos(num_videos: int, valid_fraction: float, seed: int) -> set[int]:
    n_valid = int(round(num_videos * valid_fraction))
    if valid_fraction > 0 and num_videos >= 2:
        n_valid = min(max(n_valid, 1), num_videos - 1)
    order = np.random.default_rng([seed, 1]).permutation(num_videos)
    return {int(i) for i in order[:n_valid]}


def simulate_video(seed: int, index: int, cfg: WorldConfig) -> tuple[Scene, list[SynthExpression]]:
    """The scene and expressions of video ``index`` of a dataset written with ``seed``: what the writer
    writes, plus each expression's predicate and targets (for tests and inspection)."""
    rng = np.random.default_rng([seed, 0, index])
    scene = simulate_scene(rng, cfg)
    return scene, generate_expressions(scene, rng)


def _write_frames(store: ObjectStore, frame_dir: str, scene: Scene) -> list[str]:
    names = [f"{t:05d}" for t in range(scene.num_frames)]
    for t, name in enumerate(names):
        store.write_bytes(join_uri(frame_dir, name + ".jpg"), _jpeg(scene.render(t)))
    return names


@dataclass
class _RenderedVideo:
    """One ReVOS-layout video written to storage: its frame names, expressions, and per object the COCO RLE of
    its visible pixels on every frame (None where hidden), plus the union of all objects per frame."""

    name: str
    frames: list[str]
    expressions: list[SynthExpression]
    object_rles: list[list[dict | None]]
    foreground_rles: list[dict]


def _render_revos_video(
    store: ObjectStore, out: str, seed: int, cfg: WorldConfig, index: int
) -> _RenderedVideo:
    scene, exprs = simulate_video(seed, index, cfg)
    name = f"synth/v{index:04d}"
    frames = _write_frames(store, join_uri(out, "JPEGImages", name), scene)
    objects = [[encode_mask(m) if m.any() else None for m in masks] for masks in scene.modal]
    foreground = [encode_mask(m) for m in scene.modal.any(axis=0)]
    return _RenderedVideo(name, frames, exprs, objects, foreground)


def _write_revos(
    store: ObjectStore, summary: SynthSummary, cfg: WorldConfig, valid: set[int], workers: int = 1
) -> None:
    out, seed = summary.out_dir, summary.seed
    metas: dict[str, dict] = {"train": {}, "valid": {}}
    mask_dict: dict[str, list] = {}
    foreground: dict[str, dict] = {}
    indices = range(summary.num_videos)
    render = functools.partial(_render_revos_video, store, out, seed, cfg)
    if workers > 1:  # each video is independent (its own generator): render them in parallel, in order
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            videos = list(pool.map(render, indices))
    else:
        videos = map(render, indices)
    for index, video in zip(indices, videos, strict=True):
        exprs, name = video.expressions, video.name
        anno_ids = []
        for rles in video.object_rles:
            anno_ids.append(len(mask_dict))
            mask_dict[str(anno_ids[-1])] = rles
        phantom = None  # (obj_id, anno_id) of the video's no-target object
        if any(e.type_id == NO_TARGET for e in exprs):
            phantom = (len(video.object_rles), len(mask_dict))
            mask_dict[str(phantom[1])] = [None] * cfg.num_frames
        expressions = {}
        for k, e in enumerate(exprs):
            summary.count(e)
            obj_ids = [phantom[0]] if e.type_id == NO_TARGET else list(e.targets)
            annos = [phantom[1]] if e.type_id == NO_TARGET else [anno_ids[i] for i in e.targets]
            expressions[str(k)] = {"exp": e.text, "obj_id": obj_ids, "anno_id": annos, "type_id": e.type_id}
        split = "valid" if index in valid else "train"
        metas[split][name] = {
            "vid_id": index,
            "height": cfg.height,
            "width": cfg.width,
            "frames": video.frames,
            "expressions": expressions,
        }
        foreground[name] = {"masks_rle": video.foreground_rles}
    for split, videos_of_split in metas.items():
        summary.videos_per_split[split] = len(videos_of_split)
        store.write_bytes(
            join_uri(out, f"meta_expressions_{split}_.json"), _json({"videos": videos_of_split})
        )
    store.write_bytes(join_uri(out, "mask_dict.json"), _json(mask_dict))
    store.write_bytes(join_uri(out, "mask_dict_foreground.json"), _json(foreground))


def _write_reasonvos(store: ObjectStore, summary: SynthSummary, cfg: WorldConfig) -> None:
    out, videos = summary.out_dir, {}
    for index in range(summary.num_videos):
        scene, exprs = simulate_video(summary.seed, index, cfg)
        name = f"v{index:04d}"
        frames = _write_frames(store, join_uri(out, "JPEGImages", name), scene)
        written: dict[tuple[int, ...], int] = {}  # targets -> obj_id of their annotation folder
        expressions = []
        for e in exprs:
            if e.type_id == NO_TARGET:
                continue
            if e.targets not in written:
                obj_id = (
                    e.targets[0] if len(e.targets) == 1 else GROUP_ID_BASE + sum(len(t) > 1 for t in written)
                )
                folder = join_uri(out, "Annotations", f"{SOURCE}_{name}_{obj_id}")
                for t, frame in enumerate(frames):
                    store.write_bytes(
                        join_uri(folder, frame + ".png"), _png(scene.modal[list(e.targets), t].any(0))
                    )
                written[e.targets] = obj_id
            summary.count(e)
            expressions.append(
                {
                    "obj_id": written[e.targets],
                    "exp_id": str(len(expressions)),
                    "exp_text": e.text,
                    "is_sent": e.type_id == REASONING,
                }
            )
        videos[name] = {"source": SOURCE, "frames": frames, "expressions": expressions}
    summary.videos_per_split["valid"] = len(videos)
    store.write_bytes(join_uri(out, "meta_expressions.json"), _json({"videos": videos}))


def _vicas_annotation(scene: Scene, exprs: list[SynthExpression], video_id: int, frames: list[str]) -> dict:
    """One video's ViCaS annotation file (captions left empty: the LG-VIS prompts are the expressions)."""
    segmentations = []
    for t, frame in enumerate(frames):
        visible = [i for i in range(len(scene.objects)) if scene.modal[i, t].any()]
        segmentations.append(
            {
                "filename": frame + ".jpg",
                "is_gt": t % VICAS_HUMAN_EVERY == 0,
                "track_ids": [i + 1 for i in visible],
                "mask_rles": [encode_mask(scene.modal[i, t]) for i in visible],
            }
        )
    referrals = [
        {"prompt": e.text, "track_ids": [i + 1 for i in e.targets]} for e in exprs if e.type_id != NO_TARGET
    ]
    return {
        "video_id": video_id,
        "src_dataset": SOURCE,
        "filename": f"{video_id:06d}_{SOURCE}.mp4",
        "image_size": [scene.height, scene.width],
        **dict.fromkeys(VICAS_CAPTIONS, ""),
        "reworded_en_captions": [],
        "object_referrals": referrals,
        "segmentations": segmentations,
        "all_track_ids": [i + 1 for i in range(len(scene.objects))],
    }


def _write_vicas(store: ObjectStore, summary: SynthSummary, cfg: WorldConfig, valid: set[int]) -> None:
    out = summary.out_dir
    evaluation = sorted(valid)
    splits: dict[str, list[int]] = {"train": [], "val": evaluation[0::2], "test": evaluation[1::2]}
    for index in range(summary.num_videos):
        scene, exprs = simulate_video(summary.seed, index, cfg)
        frames = _write_frames(store, join_uri(out, "video_frames", f"{index:06d}"), scene)
        for e in exprs:
            if e.type_id != NO_TARGET:
                summary.count(e)
        doc = _vicas_annotation(scene, exprs, index, frames)
        store.write_bytes(join_uri(out, "annotations", VICAS_VERSION, f"{index:06d}.json"), _json(doc))
        if index not in valid:
            splits["train"].append(index)
    for split, ids in splits.items():
        summary.videos_per_split[split] = len(ids)
        store.write_bytes(join_uri(out, "splits", VICAS_VERSION, f"{split}.json"), _json(ids))


def write_synthetic_dataset(
    out_dir: str | Path,
    layout: str = "revos",
    num_videos: int = _DEFAULTS.videos,
    num_frames: int = _DEFAULTS.frames,
    height: int = _DEFAULTS.height,
    width: int = _DEFAULTS.width,
    seed: int = _DEFAULTS.seed,
    valid_fraction: float = _DEFAULTS.valid_fraction,
    storage: StorageConfig | None = None,
    min_objects: int = _DEFAULTS.min_objects,
    max_objects: int = _DEFAULTS.max_objects,
    workers: int = 1,
) -> SynthSummary:
    """Simulate ``num_videos`` videos and write them with their expressions and masks under ``out_dir`` (a
    local folder or s3:// prefix) in the ``layout`` ("revos", "reasonvos" or "vicas"). ``valid_fraction`` of the
    videos go to the ReVOS valid split (at least one and not all of them when it is positive; ViCaS: to val and
    test by turns); ReasonVOS has one split. Each scene holds ``min_objects`` to ``max_objects`` objects.
    Existing files of the same names are replaced; others are left alone. ``workers`` > 1 renders ReVOS-layout videos in that many processes (the
    same bytes as one process: each video has its own generator)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {LAYOUTS}")
    if num_videos < 1 or num_frames < 2:
        raise ValueError(
            f"need at least 1 video and 2 frames, got {num_videos} videos of {num_frames} frames"
        )
    if not 0.0 <= valid_fraction <= 1.0:
        raise ValueError(f"valid_fraction {valid_fraction}: expected a value in [0, 1]")
    out = str(out_dir)
    store = store_for(out, storage)
    cfg = WorldConfig(
        height=height, width=width, num_frames=num_frames, min_objects=min_objects, max_objects=max_objects
    )
    summary = SynthSummary(out, layout, num_videos, num_frames, height, width, seed)
    if layout == "revos":
        _write_revos(store, summary, cfg, _valid_videos(num_videos, valid_fraction, seed), workers)
    elif layout == "vicas":
        _write_vicas(store, summary, cfg, _valid_videos(num_videos, valid_fraction, seed))
    else:
        _write_reasonvos(store, summary, cfg)
    return summary
