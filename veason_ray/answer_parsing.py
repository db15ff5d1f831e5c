"""Parsing the policy's answer under a set of reward rules (`reward_rules.py`); never raises.

`parse_answer` returns a ParsedAnswer (think text, keyframe timestamp, boxes, the format reward's answer part)
or a ParseFailure with a typed reason. Both carry whether the whole response matches the format regex
`<think>.*?</think>\\s*<answer>.*?</answer>` (DOTALL, matched against the WHOLE response: fullmatch, so any text
before <think> or after </answer>, even a newline, fails it).

What each rule changes is written on its switch in `RewardRules`; in short, with the strict rules (the default
here, which inference and the diagnostics use) a code fence, text around the JSON object and single quotes are
tolerated, the block is the first <answer> after </think>, the keyframe must be a JSON integer and a box entry
4 finite numbers; with the release's rules the JSON is read as the release's reward file reads it (exactly,
from the first answer block anywhere, `int()` of the keyframe, NaN boxes count as well-formed, and one malformed
entry leaves the boxes unscored).
"""

from __future__ import annotations

import enum
import json
import math
import re
from dataclasses import dataclass

import numpy as np

from veason_ray.reward_rules import STRICT_RULES, RewardRules

FORMAT_PATTERN = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
MAX_BOXES = 120  # docs/method.md section 4: at most 120 boxes of either side are scored

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# The release's two readings of the answer block: the format part's (a JSON object right inside the tags)
# and the other parts' (whatever the first block holds, whitespace trimmed).
_EXACT_FORMAT_BLOCK = re.compile(r"<answer>\s*(\{.*?\})\s*</answer>", re.DOTALL)
_EXACT_BLOCK = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
_DECODER = json.JSONDecoder()
_NOT_JSON = object()


class ParseFailureReason(enum.Enum):
    """Why an answer did not parse (the reward then keeps only its format part)."""

    NOT_TEXT = "not_text"
    NO_ANSWER_BLOCK = "no_answer_block"
    INVALID_JSON = "invalid_json"
    BAD_KEYFRAME = "bad_keyframe"
    BAD_BOX_LIST = "bad_box_list"


@dataclass(frozen=True)
class ParseFailure:
    """An answer that did not parse; format_match, think and answer_format as in ParsedAnswer."""

    reason: ParseFailureReason
    format_match: bool
    think: str = ""
    answer_format: float = 0.0


@dataclass(frozen=True)
class ParsedAnswer:
    """An answer whose keyframe could be read.

    keyframe: the keyframe_timestamp (a frame index; may be any integer, checked by the reward).
    boxes: (K, 4) float64 x1, y1, x2, y2 in 560 space: the well-formed entries among the first MAX_BOXES, in order.
    box_entries: length of bbox_2d_list; valid_entries: how many of all entries are well-formed.
    answer_format: the format reward's answer part in [0, 1] (well-formed entries / entries, 1 entry if none).
    boxes_scored: whether the spatial and consistency parts score these boxes (see `RewardRules`).
    considered_entries: min(box_entries, MAX_BOXES), the number of predictions the spatial reward counts.
    """

    think: str
    keyframe: int
    boxes: np.ndarray
    box_entries: int
    valid_entries: int
    format_match: bool
    answer_format: float = 0.0
    boxes_scored: bool = True

    @property
    def considered_entries(self) -> int:
        return min(self.box_entries, MAX_BOXES)


def matches_format(response: str) -> bool:
    """Whether the whole response matches `<think>.*?</think>\\s*<answer>.*?</answer>` (DOTALL)."""
    return FORMAT_PATTERN.fullmatch(response) is not None


def _block_start(response: str, rules: RewardRules) -> int:
    """Where the search for the answer block starts: after the first </think> (the start when none), or at
    the start under the release's rules."""
    if not rules.answer_after_think:
        return 0
    think_end = response.find("</think>")
    return think_end + len("</think>") if think_end >= 0 else 0


def _decode_lenient(text: str) -> object:
    """The JSON object starting at the first `{` of `text`, whatever comes before it (a code fence's opening
    line, a label) and after the value; single quotes read as double quotes. _NOT_JSON when there is none."""
    brace = text.find("{")
    if brace < 0:
        return _NOT_JSON
    for candidate in (text, text.replace("'", '"')):
        try:
            return _DECODER.raw_decode(candidate, brace)[0]
        except (ValueError, RecursionError):
            continue
    return _NOT_JSON


def _decode_exact(text: str) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _NOT_JSON


def _readings(response: str, rules: RewardRules) -> tuple[object | None, object | None]:
    """(the content's JSON, the format part's JSON); None where no answer block was found."""
    start = _block_start(response, rules)
    if rules.lenient_json:
        block = _ANSWER.search(response, start)
        data = _decode_lenient(block.group(1)) if block else None
        return data, data
    block = _EXACT_BLOCK.search(response, start)
    format_block = _EXACT_FORMAT_BLOCK.search(response, start)
    return (
        _decode_exact(block.group(1)) if block else None,
        _decode_exact(format_block.group(1)) if format_block else None,
    )


def _number(value: object, rules: RewardRules) -> float | None:
    if not rules.finite_box_numbers:
        if not isinstance(value, (int, float)):
            return None
        try:
            return float(value)
        except OverflowError:  # an integer beyond float64: as far out as it can be
            return math.copysign(math.inf, value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _box(entry: object, rules: RewardRules) -> list[float] | None:
    if not isinstance(entry, list) or len(entry) != 4:
        return None
    numbers = [_number(value, rules) for value in entry]
    return None if any(number is None for number in numbers) else numbers


def _format_keyframe(value: object, rules: RewardRules) -> bool:
    """Whether the format part accepts the keyframe: a JSON integer (the release's isinstance check also lets
    a bool through)."""
    return isinstance(value, int) and not (rules.integer_keyframe and isinstance(value, bool))


def answer_format_part(data: object, rules: RewardRules) -> float:
    """The format reward's answer part in [0, 1]: with a readable keyframe and a box list, the share of its
    entries that are well-formed boxes (an empty list counts as one entry); else 0."""
    if not isinstance(data, dict) or not _format_keyframe(data.get("keyframe_timestamp"), rules):
        return 0.0
    entries = data.get("bbox_2d_list")
    if not isinstance(entries, list):
        return 0.0
    return sum(_box(entry, rules) is not None for entry in entries) / max(len(entries), 1)


def _content_keyframe(data: dict, rules: RewardRules) -> int | None:
    value = data.get("keyframe_timestamp")
    if rules.integer_keyframe:
        return None if isinstance(value, bool) or not isinstance(value, int) else value
    try:
        return int(data.get("keyframe_timestamp", -1))
    except (TypeError, ValueError, OverflowError):
        return None


def _parse_text(response: str, rules: RewardRules) -> ParsedAnswer | ParseFailure:
    format_match = matches_format(response)
    think_match = _THINK.search(response)
    think = think_match.group(1) if think_match else ""
    data, format_data = _readings(response, rules)
    answer_format = answer_format_part(format_data, rules)

    def failure(reason: ParseFailureReason) -> ParseFailure:
        return ParseFailure(reason, format_match, think, answer_format)

    if data is None:
        return failure(ParseFailureReason.NO_ANSWER_BLOCK)
    if not isinstance(data, dict):
        return failure(ParseFailureReason.INVALID_JSON)
    keyframe = _content_keyframe(data, rules)
    if keyframe is None:
        return failure(ParseFailureReason.BAD_KEYFRAME)
    entries = data.get("bbox_2d_list")
    if not isinstance(entries, list):
        if rules.drop_malformed_boxes:
            return failure(ParseFailureReason.BAD_BOX_LIST)
        entries, scored = [], False  # the keyframe still scores; the boxes do not
    else:
        scored = bool(entries) or rules.score_empty_box_list
    boxes = [_box(entry, rules) for entry in entries]
    considered = boxes[:MAX_BOXES]
    if not rules.drop_malformed_boxes and entries:
        # The release stacks the entries into one numeric array: any malformed entry, or entries made only of
        # bools (a bool array, which its IoU cannot subtract), leave the boxes unscored.
        if any(box is None for box in considered) or all(
            isinstance(value, bool) for entry in entries[:MAX_BOXES] for value in entry
        ):
            scored = False
    kept = [box for box in considered if box is not None]
    return ParsedAnswer(
        think=think,
        keyframe=keyframe,
        boxes=np.array(kept, dtype=np.float64).reshape(-1, 4),
        box_entries=len(entries),
        valid_entries=sum(box is not None for box in boxes),
        format_match=format_match,
        answer_format=answer_format,
        boxes_scored=scored,
    )


def parse_answer(response: object, rules: RewardRules = STRICT_RULES) -> ParsedAnswer | ParseFailure:
    """Parse a policy response under `rules`; never raises (anything unexpected becomes a ParseFailure)."""
    if not isinstance(response, str):
        return ParseFailure(ParseFailureReason.NOT_TEXT, False)
    try:
        return _parse_text(response, rules)
    except Exception:  # the reward must never raise on any model output
        return ParseFailure(ParseFailureReason.INVALID_JSON, False)
