"""What the CoT teacher is asked (docs/method.md section 6).

The teacher sees the sampled frames, each after its timestamp `(<index>s)`, with red boxes drawn around the
target(s), and is told the expression and the keyframe. It writes three steps: describe the video, justify why
the keyframe shows the target best, locate the target(s) in it, without ever mentioning the red boxes (the
policy will not see them). One of three example answers is shown as a style guide, chosen at random per
sample with a generator seeded by (seed, sample key), so a rerun asks the same question.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from veason_ray.prompts import SYSTEM_PROMPT, frame_timestamp, normalize_expression
from veason_ray.sample_building import sample_rng

EXAMPLE_TEMPLATES: tuple[str, ...] = (
    "The video shows a grassy park where two dogs run after a ball while a man watches from a bench; the "
    "brown dog reaches the ball first and carries it back. The expression asks for the dog that wins the race "
    "to the ball. At 12s the brown dog is fully visible in the open, facing the camera with the ball in its "
    "mouth, so this frame shows the target best. In that frame the brown dog stands in the lower middle of the "
    "image, left of the bench, with its whole body in view.",
    "Several cars wait at a crossroads; when the light turns green, a white van pulls out and overtakes a red "
    "car in the right lane. The target is the vehicle that overtakes the others. The frame at 5s is the best "
    "one: the white van has just left the queue, is not hidden by any other car and is at its largest. There "
    "the van occupies the right half of the road, slightly above the centre of the frame, ahead of the red car.",
    "A woman in a blue coat and a child walk along a beach while gulls fly overhead; the child stops to pick up "
    "a shell. The expression refers to the person who bends down. At 20s the child is crouching and clearly "
    "separated from the woman, which makes it the clearest view of the target. In this frame the child is in "
    "the lower left part of the image, close to the waterline, with the woman standing to the right.",
)

_INSTRUCTION = (
    "You are given {num_frames} frames sampled from a video, in order; each image is preceded by its timestamp "
    "({timestamps}). The object(s) referred to by the expression '{expression}' {target_verb} marked with red "
    "boxes to help you; there {count_phrase}.\n"
    "The frame at {keyframe} is where the target is best represented.\n"
    "Write the reasoning that leads from the video and the expression to this answer, in three steps:\n"
    "1. Describe what happens in the video, as far as it matters for the expression.\n"
    "2. Explain why the frame at {keyframe} is the one where the target is best represented (visibility, size, "
    "occlusion, the moment the expression describes).\n"
    "3. Locate the target(s) in that frame: where in the image, what they look like, and how they relate to the "
    "other objects.\n"
    "Write it as one paragraph of plain prose, as if you had found the target yourself: never mention red boxes, "
    "marks, annotations or these instructions, give no coordinates and use no tags or lists.\n"
    "Here is an example of the style expected (for another video):\n{example}"
)


@dataclass(frozen=True)
class TeacherInstruction:
    """The instruction text and which example template it shows (0-2)."""

    text: str
    template_index: int


def choose_template(seed: int, key: str, count: int = len(EXAMPLE_TEMPLATES)) -> int:
    """The example template of one sample: uniform over ``count``, a function of (seed, key) only."""
    return int(sample_rng(seed, f"cot-template/{key}", 0).integers(count))


def teacher_instruction(
    expression: str, frame_indices: Sequence[int], keyframe: int, num_targets: int, template_index: int
) -> TeacherInstruction:
    """The 3-step instruction for one sample (it follows the frames in the user turn). ``num_targets``: target
    objects visible on the keyframe (the number of boxes of the answer)."""
    if keyframe not in frame_indices:
        raise ValueError(f"keyframe {keyframe} is not one of the frames {list(frame_indices)}")
    if not 0 <= template_index < len(EXAMPLE_TEMPLATES):
        raise ValueError(f"template_index {template_index}: expected 0..{len(EXAMPLE_TEMPLATES) - 1}")
    plural = num_targets != 1
    text = _INSTRUCTION.format(
        num_frames=len(frame_indices),
        timestamps=", ".join(frame_timestamp(i) for i in frame_indices),
        expression=normalize_expression(expression),
        target_verb="are" if plural else "is",
        count_phrase=f"are {num_targets} target objects" if plural else "is one target object",
        keyframe=frame_timestamp(keyframe),
        example=EXAMPLE_TEMPLATES[template_index],
    )
    return TeacherInstruction(text, template_index)


def teacher_messages(
    frame_indices: Sequence[int], image_urls: Sequence[str], instruction: TeacherInstruction
) -> list[dict]:
    """Chat-completions messages: the system prompt, then per frame its timestamp and its image (a URL, e.g.
    a base64 data URL of the boxed frame), then the instruction."""
    if len(image_urls) != len(frame_indices):
        raise ValueError(f"{len(image_urls)} images for {len(frame_indices)} frame indices")
    content: list[dict] = []
    for frame_index, url in zip(frame_indices, image_urls, strict=True):
        content.append({"type": "text", "text": frame_timestamp(frame_index)})
        content.append({"type": "image_url", "image_url": {"url": url}})
    content.append({"type": "text", "text": "\n" + instruction.text})
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]
