"""The CoT-SFT record: one ShareGPT conversation per line of `<output_dir>/cot.jsonl` (docs/method.md section 6).

    {"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                  {"role": "user", "content": "(<idx>s)<image>(<idx>s)<image>...\\n<instruction>"},
                  {"role": "assistant", "content": "<think>{CoT}</think>\\n<answer>{json}</answer>"}],
     "images": ["images/<safe key>/<frame idx>.jpg", ...],
     "veason": {"key", "dataset", "split", "video", "exp_id", "expression", "type_id", "obj_ids",
                "frame_indices", "keyframe", "boxes_560", "teacher"}}

The user text is :func:`veason_ray.prompts.build_user_content` with each image item written as `<image>`
(LLaMA-Factory's placeholder); the images are the clean frames at 560x560 (JPEG quality 95, paths relative to
the output folder, in prompt order); the assistant turn is :func:`veason_ray.prompts.render_answer` with the
keyframe's boxes in 560 space. ``boxes_560`` holds one box per target object visible on the keyframe (an
absent object has none, see :mod:`veason_ray.cot.jobs`), so it may be shorter than ``obj_ids``.
:func:`load_sft_example` turns a record back into exactly the prompt the rollout engine renders.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from veason_ray.config import StorageConfig
from veason_ray.cot.jobs import CoTJob
from veason_ray.object_store import join_uri, store_for
from veason_ray.prompts import SYSTEM_PROMPT, build_messages, build_user_content, render_answer
from veason_ray.video_decoding import decode_jpeg

COT_FILE = "cot.jsonl"
FAILURES_FILE = "failures.jsonl"
DATASET_INFO_FILE = "dataset_info.json"
IMAGE_DIR = "images"
IMAGE_PLACEHOLDER = "<image>"
DATASET_NAME = "veason_cot"
DATASET_INFO: dict[str, Any] = {
    DATASET_NAME: {
        "file_name": COT_FILE,
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {
            "role_tag": "role",
            "content_tag": "content",
            "user_tag": "user",
            "assistant_tag": "assistant",
            "system_tag": "system",
        },
    }
}
VEASON_FIELDS = (
    "key",
    "dataset",
    "split",
    "video",
    "exp_id",
    "expression",
    "type_id",
    "obj_ids",
    "frame_indices",
    "keyframe",
    "boxes_560",
    "teacher",
)


def safe_key(key: str) -> str:
    """A folder name for a sample key: unsafe characters become "_", plus 8 hex digits of the key's hash so
    keys that differ only in those characters stay apart."""
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', key).strip('._')}-{digest}"


def image_path(key: str, frame_index: int) -> str:
    """`images/<safe key>/<frame index>.jpg`, relative to the output folder."""
    return f"{IMAGE_DIR}/{safe_key(key)}/{int(frame_index)}.jpg"


def user_text(frame_indices: list[int] | tuple[int, ...], expression: str) -> str:
    """The user turn of :func:`build_user_content` as one string, each image written as `<image>`."""
    return "".join(
        item["text"] if item["type"] == "text" else IMAGE_PLACEHOLDER
        for item in build_user_content(frame_indices, expression)
    )


def make_record(job: CoTJob, think: str, teacher: str) -> dict[str, Any]:
    """The record of one sample whose teacher wrote ``think`` (the CoT text, without tags)."""
    r = job.record
    # whole pixels of the 560x560 frame: a policy copies integers more reliably than 2-decimal fractions
    boxes = [[int(round(float(v))) for v in box] for box in np.asarray(job.boxes_560).reshape(-1, 4)]
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": user_text(job.frame_indices, r.expression)},
            {"role": "assistant", "content": render_answer(think, job.keyframe, boxes)},
        ],
        "images": [image_path(job.key, i) for i in job.frame_indices],
        "veason": {
            "key": job.key,
            "dataset": r.dataset,
            "split": r.split,
            "video": r.video,
            "exp_id": r.exp_id,
            "expression": r.expression,
            "type_id": r.type_id,
            "obj_ids": list(r.obj_ids),
            "frame_indices": list(job.frame_indices),
            "keyframe": int(job.keyframe),
            "boxes_560": boxes,
            "teacher": teacher,
        },
    }


def validate_record(record: Any) -> None:
    """ValueError naming the first field that does not follow the record format."""
    if not isinstance(record, dict):
        raise ValueError(f"a CoT record must be a JSON object, got {type(record).__name__}")
    messages = record.get("messages")
    roles = [m.get("role") for m in messages] if isinstance(messages, list) else None
    if roles != ["system", "user", "assistant"] or not all(
        isinstance(m.get("content"), str) for m in messages
    ):
        raise ValueError("messages: expected system, user and assistant turns with string content")
    meta = record.get("veason")
    if not isinstance(meta, dict) or any(f not in meta for f in VEASON_FIELDS):
        missing = [f for f in VEASON_FIELDS if not isinstance(meta, dict) or f not in meta]
        raise ValueError(f"veason: missing fields {missing}")
    images = record.get("images")
    if not isinstance(images, list) or len(images) != len(meta["frame_indices"]):
        raise ValueError("images: expected one image path per entry of veason.frame_indices")
    if messages[1]["content"].count(IMAGE_PLACEHOLDER) != len(images):
        raise ValueError(f"messages[1].content: expected one {IMAGE_PLACEHOLDER} per image")
    if meta["keyframe"] not in meta["frame_indices"]:
        raise ValueError(f"veason.keyframe {meta['keyframe']} is not in veason.frame_indices")


def load_sft_example(
    record: dict[str, Any], root: str, storage: StorageConfig | None = None
) -> tuple[list[dict[str, Any]], str]:
    """(prompt messages, assistant answer text) of one record: the messages are exactly
    ``prompts.build_messages(frame_indices, expression, frames)`` with the frames (S, S, 3) uint8 RGB read from
    the record's images under ``root`` (the output folder: local or s3://), as the rollout engine renders them."""
    validate_record(record)
    meta = record["veason"]
    store = store_for(root, storage)
    frames = []
    for rel in record["images"]:
        uri = join_uri(root, rel)
        frames.append(decode_jpeg(store.read_bytes(uri), uri))
    messages = build_messages(meta["frame_indices"], meta["expression"], frames)
    return messages, record["messages"][2]["content"]


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSONL file in order; a line that does not parse (an interrupted write) is skipped."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue
