"""Parsing the policy's answer; never raises.

`parse_answer` returns a ParsedAnswer (think text, keyframe timestamp, boxes) or a ParseFailure with a typed
reason. Both carry whether the whole response matches the format regex
`<think>.*?</think>\\s*<answer>.*?</answer>` (DOTALL, matched against the WHOLE response: fullmatch, so any text
before <think> or after </answer>, even a newline, fails it).

Tolerated inside the answer block: a ``` code fence or any other text before the first `{` and after the
JSON object, single quotes instead of double quotes. Rejected (a ParseFailure): no
<answer>...</answer> block after the thinking, no JSON object in it, keyframe_timestamp missing or not an integer
(a float, a bool or a string is not), bbox_2d_list missing or not a list. Box entries that are not a list of 4
finite numbers (int or float, not bool; NaN, Infinity and overflowing numbers are not finite) are counted
but not kept.
"""

from __future__ import annotations

import enum
import json
import math
import re
from dataclasses import dataclass

import numpy as np

FORMAT_PATTERN = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
MAX_BOXES = 120

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_DECODER = json.JSONDecoder()


class ParseFailureReason(enum.Enum):
    """Why an answer did not parse (the reward then keeps only its format part)."""

    NOT_TEXT = "not_text"
    NO_ANSWER_BLOCK = "no_answer_block"
    INVALID_JSON = "invalid_json"
    BAD_KEYFRAME = "bad_keyframe"
    BAD_BOX_LIST = "bad_box_list"


@dataclass(frozen=True)
class ParseFailure:
    """An answer that did not parse; format_match and think as in ParsedAnswer."""

    reason: ParseFailureReason
    format_match: bool
    think: str = ""


@dataclass(frozen=True)
class ParsedAnswer:
    """A well-formed answer.

    keyframe: the keyframe_timestamp (a frame index; may be any integer, checked by the reward).
    boxes: (K, 4) float64 x1, y1, x2, y2 in 560 space: the valid entries among the first MAX_BOXES, in order.
    box_entries: length of bbox_2d_list; valid_entries: how many of all entries are 4 finite numbers.
    considered_entries: min(box_entries, MAX_BOXES), the number of predictions the spatial reward counts.
    """

    think: str
    keyframe: int
    boxes: np.ndarray
    box_entries: int
    valid_entries: int
    format_match: bool

    @property
    def considered_entries(self) -> int:
        return min(self.box_entries, MAX_BOXES)


def matches_format(response: str) -> bool:
    """Whether the whole response matches `<think>.*?</think>\\s*<answer>.*?</answer>` (DOTALL)."""
    return FORMAT_PATTERN.fullmatch(response) is not None


def _answer_text(response: str) -> str | None:
    """Content of the first <answer>...</answer> after the first </think> (after the start when none)."""
    think_end = response.find("</think>")
    start = think_end + len("</think>") if think_end >= 0 else 0
    match = _ANSWER.search(response, start)
    return match.group(1) if match else None


def _decode_object(text: str) -> object | None:
    """The JSON object starting at the first `{` of `text`, else None. Whatever comes before it (a code fence's
    opening line, a label) and after the value (a closing fence, trailing words) is ignored."""
    brace = text.find("{")
    if brace < 0:
        return None
    for candidate in (text, text.replace("'", '"')):
        try:
            return _DECODER.raw_decode(candidate, brace)[0]
        except (ValueError, RecursionError):
            continue
    return None


def _finite_number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _box(entry: object) -> list[float] | None:
    if not isinstance(entry, list) or len(entry) != 4:
        return None
    numbers = [_finite_number(value) for value in entry]
    return None if any(number is None for number in numbers) else numbers


def _parse_text(response: str) -> ParsedAnswer | ParseFailure:
    format_match = matches_format(response)
    think_match = _THINK.search(response)
    think = think_match.group(1) if think_match else ""
    answer = _answer_text(response)
    if answer is None:
        return ParseFailure(ParseFailureReason.NO_ANSWER_BLOCK, format_match, think)
    data = _decode_object(answer)
    if not isinstance(data, dict):
        return ParseFailure(ParseFailureReason.INVALID_JSON, format_match, think)
    keyframe = data.get("keyframe_timestamp")
    if isinstance(keyframe, bool) or not isinstance(keyframe, int):
        return ParseFailure(ParseFailureReason.BAD_KEYFRAME, format_match, think)
    entries = data.get("bbox_2d_list")
    if not isinstance(entries, list):
        return ParseFailure(ParseFailureReason.BAD_BOX_LIST, format_match, think)
    boxes = [_box(entry) for entry in entries]
    kept = [box for box in boxes[:MAX_BOXES] if box is not None]
    return ParsedAnswer(
        think=think,
        keyframe=keyframe,
        boxes=np.array(kept, dtype=np.float64).reshape(-1, 4),
        box_entries=len(entries),
        valid_entries=sum(box is not None for box in boxes),
        format_match=format_match,
    )


def parse_answer(response: object) -> ParsedAnswer | ParseFailure:
    """Parse a policy response; never raises (anything unexpected becomes a ParseFailure)."""
    if not isinstance(response, str):
        return ParseFailure(ParseFailureReason.NOT_TEXT, False)
    try:
        return _parse_text(response)
    except Exception:  # the reward must never raise on any model output
        return ParseFailure(ParseFailureReason.INVALID_JSON, False)
