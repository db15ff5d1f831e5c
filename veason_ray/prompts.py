"""The policy's prompt and answer schema (docs/method.md section 3).

The user turn is a list of chat-content items in the order the model reads them: for each sampled frame its
timestamp `(<frame index>s)` then the frame (560x560 RGB), then the instruction. Engines and processors render
it with the model's chat template; this module knows nothing of tokenizers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

SYSTEM_PROMPT = "You are a helpful assistant."
ANSWER_SCHEMA = '{"keyframe_timestamp": <int frame index>, "bbox_2d_list": [[x1, y1, x2, y2], ...]}'

_INSTRUCTION = (
    "You are given {num_frames} frames uniformly sampled from a 1 FPS video. "
    "Each image is preceded by its timestamp.\n"
    "Given the following expression: '{expression}', identify the timestamp where the target is best "
    "represented. Then, locate the target in that frame by predicting the bounding box(es).\n"
    "First, output the thinking process in <think> </think> tags, and then output the result in the following "
    "format within <answer> </answer> tags."
)
_SCHEMA_LINE = (
    "\n<answer>"
    + ANSWER_SCHEMA
    + "</answer>, with the timestamp of the chosen frame and one box per target in "
    "the pixels of the 560x560 frame."
)


def normalize_expression(expression: str) -> str:
    """The expression as the release puts it in the prompt: stripped, lower-cased, without surrounding dots."""
    return expression.strip().lower().strip(".")


def render_instruction(expression: str, num_frames: int, include_answer_schema: bool = True) -> str:
    """The instruction text that follows the frames. With include_answer_schema=False it is the release's text
    word for word (useful to evaluate the public checkpoint); by default it also spells out the answer schema."""
    text = _INSTRUCTION.format(num_frames=num_frames, expression=normalize_expression(expression))
    return text + _SCHEMA_LINE if include_answer_schema else text


def frame_timestamp(frame_index: int) -> str:
    """Timestamp text that precedes a frame: its index in the video, read as seconds."""
    return f"({int(frame_index)}s)"


def build_user_content(
    frame_indices: Sequence[int],
    expression: str,
    frames: Sequence[Any] | None = None,
    include_answer_schema: bool = True,
) -> list[dict[str, Any]]:
    """User-turn content items: per frame {"type": "text", "text": "(<idx>s)"} then {"type": "image"} (with
    "image": frames[i] when frames are given, e.g. PIL images or (560, 560, 3) uint8 arrays), then
    {"type": "text", "text": instruction}."""
    if frames is not None and len(frames) != len(frame_indices):
        raise ValueError(f"{len(frames)} frames for {len(frame_indices)} frame indices")
    content: list[dict[str, Any]] = []
    for position, frame_index in enumerate(frame_indices):
        content.append({"type": "text", "text": frame_timestamp(frame_index)})
        image: dict[str, Any] = {"type": "image"}
        if frames is not None:
            image["image"] = frames[position]
        content.append(image)
    instruction = render_instruction(expression, len(frame_indices), include_answer_schema)
    content.append({"type": "text", "text": "\n" + instruction})
    return content


def build_messages(
    frame_indices: Sequence[int],
    expression: str,
    frames: Sequence[Any] | None = None,
    include_answer_schema: bool = True,
) -> list[dict[str, Any]]:
    """Chat messages: the system prompt, then the user turn of build_user_content."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {
            "role": "user",
            "content": build_user_content(frame_indices, expression, frames, include_answer_schema),
        },
    ]


def _coordinate(value: float) -> int | float:
    rounded = round(float(value), 2)
    return int(rounded) if rounded.is_integer() else rounded


def render_answer(think: str, keyframe: int, boxes: np.ndarray | Sequence[Sequence[float]]) -> str:
    """An assistant answer in the schema: `<think>...</think>\\n<answer>{json}</answer>`, boxes (K, 4) in 560
    space rounded to 2 decimals, whole pixels written as integers (`118`, not `118.0`: the CoT-SFT records' form,
    which a small policy copies more reliably)."""
    box_list = [[_coordinate(v) for v in box] for box in np.asarray(boxes, dtype=np.float64).reshape(-1, 4)]
    answer = json.dumps({"keyframe_timestamp": int(keyframe), "bbox_2d_list": box_list})
    return f"<think>{think}</think>\n<answer>{answer}</answer>"


# A coordinate the constrained answer may write: a pixel of the 560x560 frame, 0..559, with up to 2 decimals (the
# form of render_answer and the CoT-SFT records).
_COORDINATE = r"(0|[1-9][0-9]?|[1-4][0-9]{2}|5[0-5][0-9])(\.[0-9]{1,2})?"


def answer_regex(frame_indices: Sequence[int], max_think_chars: int = 256, max_boxes: int = 8) -> str:
    """A regular expression every well-formed answer to a prompt of `frame_indices` matches, for constrained
    decoding (vLLM's structured outputs): a think block of at most `max_think_chars` characters without '<',
    then the answer JSON in `render_answer`'s layout with a keyframe among the prompt's timestamps and 1 to
    `max_boxes` boxes inside the 560x560 frame. An untrained or weak checkpoint then always gives an
    answer SAM2 can segment; what it chooses inside the format is still the policy's."""
    if max_think_chars < 0 or max_boxes < 1:
        raise ValueError(
            f"max_think_chars must be >= 0 and max_boxes >= 1, got {max_think_chars}, {max_boxes}"
        )
    keyframes = "|".join(str(int(i)) for i in sorted(set(frame_indices)))
    box = rf"\[{_COORDINATE}, {_COORDINATE}, {_COORDINATE}, {_COORDINATE}\]"
    boxes = rf"\[{box}(, {box}){{0,{max_boxes - 1}}}\]"
    return (
        rf"<think>[^<]{{0,{max_think_chars}}}</think>\n<answer>"
        rf'\{{"keyframe_timestamp": ({keyframes}), "bbox_2d_list": {boxes}\}}</answer>'
    )


def constrained_answer_max_chars(max_frame_index: int, max_think_chars: int, max_boxes: int) -> int:
    """The longest answer `answer_regex` admits, in characters: a bound on its tokens too (a token holds at least
    one character), so a constrained answer always ends within this many new tokens."""
    box = len("[559.99, 559.99, 559.99, 559.99]")
    frame = render_answer("", max_frame_index, np.zeros((0, 4)))
    return len(frame) + max_think_chars + max_boxes * box + (max_boxes - 1) * len(", ")
