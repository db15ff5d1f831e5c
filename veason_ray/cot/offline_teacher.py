"""The offline teacher: a chain of thought written from the ground truth, no model involved.

For the synthetic world, tests and the demo: it goes through the same path as a real teacher (a
:class:`~veason_ray.cot.client.ChatReply` turned into the record by the same code). The text follows the three
steps a real teacher is asked for, built only from the sample: the expression, on which sampled frames the
target is visible and how large it is, why the keyframe is chosen (the largest visible target among the sampled
frames, or close to it), and where each target lies on the keyframe (image region and size, from its box).
The same sample always gets the same text.
"""

from __future__ import annotations

import numpy as np

from veason_ray.boxes import FRAME_SIZE
from veason_ray.cot.client import ChatReply
from veason_ray.cot.jobs import CoTJob
from veason_ray.cot.teacher_prompts import TeacherInstruction
from veason_ray.prompts import normalize_expression

OFFLINE_TEACHER = "offline"


def _at(frame_index: int) -> str:
    return f"{int(frame_index)}s"


def _region(box: np.ndarray) -> str:
    """Where a 560-space box's centre lies: 'the upper left', 'the centre', ..."""
    cx, cy = (box[0] + box[2]) / 2 / FRAME_SIZE, (box[1] + box[3]) / 2 / FRAME_SIZE
    row = "upper" if cy < 1 / 3 else ("lower" if cy > 2 / 3 else "middle")
    col = "left" if cx < 1 / 3 else ("right" if cx > 2 / 3 else "centre")
    return "the centre" if (row, col) == ("middle", "centre") else f"the {row} {col}"


def _size(box: np.ndarray) -> str:
    share = max(box[2] - box[0], 0) * max(box[3] - box[1], 0) / FRAME_SIZE**2
    return "small" if share < 0.03 else ("medium-sized" if share < 0.15 else "large")


def describe_video(job: CoTJob) -> str:
    """Step 1: what the frames show about the target (visibility over the sampled frames)."""
    expression = normalize_expression(job.record.expression)
    visible = [
        i
        for i, boxes in zip(job.frame_indices, job.object_boxes, strict=True)
        if any(b is not None for b in boxes)
    ]
    hidden = [i for i in job.frame_indices if i not in visible]
    targets = len(job.record.obj_ids)
    what = "one object" if targets == 1 else f"{targets} objects"
    text = (
        f"The video is shown in {len(job.frame_indices)} frames, from {_at(job.frame_indices[0])} to "
        f"{_at(job.frame_indices[-1])}. The expression '{expression}' refers to {what}, which "
        f"{'is' if targets == 1 else 'are'} visible at {', '.join(_at(i) for i in visible)}"
    )
    if hidden:
        text += f" and out of sight at {', '.join(_at(i) for i in hidden)}"
    return text + "."


def justify_keyframe(job: CoTJob) -> str:
    """Step 2: why the keyframe (its visible target area compared with the other sampled frames)."""
    position = job.keyframe_position
    fractions = job.area_fractions
    best = int(np.argmax(fractions))
    share = 100.0 * float(fractions[position])
    if position == best:
        reason = "the target is at its largest there"
    else:
        reason = f"the target is nearly as large there as at its largest ({_at(job.frame_indices[best])})"
    return (
        f"At {_at(job.keyframe)} the target covers about {share:.1f}% of the image and {reason}, so this "
        "frame is where it is best represented."
    )


def locate_targets(job: CoTJob) -> str:
    """Step 3: where each target lies on the keyframe."""
    parts = [
        f"a {_size(box)} object in {_region(box)} of the frame"
        for box in np.asarray(job.boxes_560).reshape(-1, 4)
    ]
    if len(parts) == 1:
        return f"In that frame the target is {parts[0]}."
    return f"In that frame there are {len(parts)} targets: " + "; ".join(parts) + "."


def offline_cot(job: CoTJob) -> str:
    """The three steps as one paragraph."""
    return " ".join((describe_video(job), justify_keyframe(job), locate_targets(job)))


class OfflineTeacher:
    """A :class:`~veason_ray.cot.teacher.Teacher` that writes :func:`offline_cot` (the instruction is unused)."""

    name = OFFLINE_TEACHER

    async def write_cot(self, job: CoTJob, instruction: TeacherInstruction) -> ChatReply:
        return ChatReply(text=offline_cot(job), finish_reason="stop", attempts=1)
