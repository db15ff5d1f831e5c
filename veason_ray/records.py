"""The records that cross process boundaries (design.md): small dataclasses, cheap to pickle, no model objects.

    ExpressionRecord  one expression of a dataset split, as the readers of `veason_ray/datasets/` yield it
    Sample            an ExpressionRecord made model-ready: its sampled frames (560x560) and the ground truth the
                      rewards need
    PromptGroup       one Sample + its group id: the unit of GRPO (n responses share it)
    Rollout           one sampled response of a group, with its tokens and log-probabilities
    Scored            a Rollout with its reward parts
    TrainItem         one response with its advantage, as the learner receives it

Frames may travel as an array or as a reference into Ray's object store (put once per sample, not copied per
response); this module never imports ray, so `frames` is typed loosely and `resolve_frames` is given a getter.
It imports no dataset reader either (they need pycocotools), so processes that only move records stay light.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from veason_ray.prompts import build_messages

if TYPE_CHECKING:
    from veason_ray.reward_scoring import RewardBreakdown

TYPE_REFERRING = 0
TYPE_REASONING = 1
TYPE_NO_TARGET = 2
TYPE_NAMES = {TYPE_REFERRING: "referring", TYPE_REASONING: "reasoning", TYPE_NO_TARGET: "no_target"}


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

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ExpressionRecord:
        """The record from its `dataclasses.asdict` form after a JSON round trip (lists back to tuples)."""
        return cls(**{**doc, "obj_ids": tuple(doc["obj_ids"]), "anno_ids": tuple(doc["anno_ids"])})


def sample_key(record: ExpressionRecord) -> str:
    """``dataset/split/video/exp_id``: unique across datasets and splits (the id of a Sample and of its cache
    rows; a record's own ``key`` is unique within its split only)."""
    return f"{record.dataset}/{record.split}/{record.key}"


@dataclass
class Sample:
    """One expression made model-ready: the record it was built from and what was sampled and decoded for it.

    record: the expression (dataset, split, video, exp_id, text, type, object ids).
    frame_indices: the sampled frames' indices in the video (ascending; the prompt's timestamps).
    keyframe: the training keyframe among them (drawn from the top-5 GT-area frames), None in evaluation.
    frames: (T, 560, 560, 3) uint8 RGB, or an object-store reference to such an array.
    gt_masks_560: (T, 560, 560) bool GT union masks at the sampled frames (nearest).
    gt_boxes_560: per sampled frame, (N, 4) float64 GT boxes in 560 space (absent object -> zeros).
    original_size: (height, width) of the video's frames in pixels.
    """

    record: ExpressionRecord
    frame_indices: tuple[int, ...]
    keyframe: int | None
    frames: Any
    gt_masks_560: np.ndarray
    gt_boxes_560: list[np.ndarray]
    original_size: tuple[int, int]
    num_video_frames: int

    @property
    def key(self) -> str:
        """A stable id: dataset/split/video/exp_id."""
        return sample_key(self.record)

    def resolve_frames(self, get: Callable[[Any], np.ndarray] | None = None) -> np.ndarray:
        """The frames as an array; `get` (e.g. ray.get) resolves a reference."""
        if isinstance(self.frames, np.ndarray):
            return self.frames
        if get is None:
            raise TypeError(f"sample {self.key}: frames are a reference; pass a getter such as ray.get")
        return get(self.frames)

    def messages(self, frames: np.ndarray | None = None) -> list[dict[str, Any]]:
        """The chat prompt (system + user turn with the frames); frames default to `self.frames`."""
        frames = self.frames if frames is None else frames
        return build_messages(self.frame_indices, self.record.expression, list(frames))


@dataclass
class PromptGroup:
    """One Sample and the id of its GRPO group; `n` responses are sampled for it."""

    group_id: int
    sample: Sample


@dataclass
class Rollout:
    """One sampled response. token_ids / logprobs: the response tokens and their log-probabilities under the
    sampling policy (the GRPO old log-probs when the learner does not recompute them)."""

    group_id: int
    response_index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    weight_version: int
    prompt_token_count: int = 0


@dataclass
class Scored:
    """A Rollout and its reward parts; `reward.total` is what GRPO normalises within the group."""

    rollout: Rollout
    reward: RewardBreakdown
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainItem:
    """One response to learn from, as the driver hands it to the learner: its group (frames by reference;
    items of one group share the object, so it is pickled once), the response tokens, the log-probs the engine
    reported for them, and the response's GRPO advantage."""

    group: PromptGroup
    token_ids: list[int]
    logprobs: list[float]
    advantage: float
