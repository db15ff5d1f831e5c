"""parse_answer: what it tolerates, what it rejects, and the fullmatch format regex."""

from __future__ import annotations

import pytest

from veason_ray.answer_parsing import (
    MAX_BOXES,
    ParsedAnswer,
    ParseFailure,
    ParseFailureReason,
    matches_format,
    parse_answer,
)

GOOD = '<think>the cat moves left</think>\n<answer>{"keyframe_timestamp": 12, "bbox_2d_list": [[1, 2, 30.5, 40]]}</answer>'


def _answer(body: str) -> str:
    return f"<think>t</think><answer>{body}</answer>"


def _parsed(text: str) -> ParsedAnswer:
    result = parse_answer(text)
    assert isinstance(result, ParsedAnswer), result
    return result


def _failure(text: object) -> ParseFailureReason:
    result = parse_answer(text)
    assert isinstance(result, ParseFailure), result
    return result.reason


def test_well_formed_answer():
    parsed = _parsed(GOOD)
    assert parsed.think == "the cat moves left" and parsed.keyframe == 12
    assert parsed.boxes.tolist() == [[1, 2, 30.5, 40]] and parsed.boxes.dtype.name == "float64"
    assert parsed.box_entries == parsed.valid_entries == 1 and parsed.format_match


def test_format_regex_is_a_fullmatch_with_dotall():
    assert matches_format("<think>a\nb</think>  \n<answer>x\ny</answer>")
    assert matches_format("<think></think><answer></answer>")
    assert not matches_format(GOOD + "\n")  # anything after </answer>, even a newline
    assert not matches_format(" " + GOOD)  # anything before <think>
    assert not matches_format("<think>a</think> text <answer>x</answer>")  # only whitespace in between
    assert not matches_format("<answer>x</answer>")
    # Lazy groups still stretch to make the WHOLE string match: a second block is swallowed.
    assert matches_format("<think>a</think><answer>x</answer><answer>y</answer>")


def test_tolerated_forms():
    fenced = '<think>t</think><answer>```json\n{"keyframe_timestamp": 3, "bbox_2d_list": []}\n```</answer>'
    assert _parsed(fenced).keyframe == 3
    single = "<think>t</think><answer>{'keyframe_timestamp': 4, 'bbox_2d_list': [[1, 2, 3, 4]]}</answer>"
    assert _parsed(single).boxes.tolist() == [[1, 2, 3, 4]]
    trailing = '<think>t</think><answer>Answer: {"keyframe_timestamp": 5, "bbox_2d_list": []} done</answer>'
    assert _parsed(trailing).keyframe == 5
    after = GOOD + " thanks!"
    parsed = _parsed(after)
    assert parsed.keyframe == 12 and not parsed.format_match
    no_think = '<answer>{"keyframe_timestamp": 1, "bbox_2d_list": []}</answer>'
    assert _parsed(no_think).think == "" and not _parsed(no_think).format_match


def test_answer_block_is_taken_after_the_thinking():
    text = (
        '<think>I could say <answer>{"keyframe_timestamp": 1, "bbox_2d_list": []}</answer></think>'
        '<answer>{"keyframe_timestamp": 2, "bbox_2d_list": []}</answer>'
    )
    assert _parsed(text).keyframe == 2


@pytest.mark.parametrize(
    "text, reason",
    [
        (None, ParseFailureReason.NOT_TEXT),
        (b"<answer>{}</answer>", ParseFailureReason.NOT_TEXT),
        ("<think>t</think>", ParseFailureReason.NO_ANSWER_BLOCK),
        (
            '<think>t</think><answer>{"keyframe_timestamp": 1, "bbox_2d_list": []}',
            ParseFailureReason.NO_ANSWER_BLOCK,
        ),
        (_answer("no json here"), ParseFailureReason.INVALID_JSON),
        (_answer('{"keyframe_timestamp": 1, '), ParseFailureReason.INVALID_JSON),
        (_answer("[1, 2]"), ParseFailureReason.INVALID_JSON),
        (_answer('{"bbox_2d_list": []}'), ParseFailureReason.BAD_KEYFRAME),
        (_answer('{"keyframe_timestamp": 1.0, "bbox_2d_list": []}'), ParseFailureReason.BAD_KEYFRAME),
        (_answer('{"keyframe_timestamp": "3", "bbox_2d_list": []}'), ParseFailureReason.BAD_KEYFRAME),
        (_answer('{"keyframe_timestamp": true, "bbox_2d_list": []}'), ParseFailureReason.BAD_KEYFRAME),
        (_answer('{"keyframe_timestamp": 3}'), ParseFailureReason.BAD_BOX_LIST),
        (_answer('{"keyframe_timestamp": 3, "bbox_2d_list": {"a": 1}}'), ParseFailureReason.BAD_BOX_LIST),
        (_answer('{"keyframe_timestamp": 3, "bbox_2d_list": [1, 2, 3, 4}'), ParseFailureReason.INVALID_JSON),
    ],
)
def test_rejected_forms(text, reason):
    assert _failure(text) == reason


def test_objects_without_the_keys_or_unclosed():
    assert _failure('<think>t</think><answer>{"a": 1} </answer>') == ParseFailureReason.BAD_KEYFRAME
    assert _failure("<think>t</think><answer>x {} </answer>") == ParseFailureReason.BAD_KEYFRAME
    assert _failure('<think>t</think><answer>{"keyframe_timestamp": 1, "bbox_2d_list": []</answer>') == (
        ParseFailureReason.INVALID_JSON
    )


def test_failure_keeps_format_flag_and_think():
    failure = parse_answer("<think>why</think><answer>oops</answer>")
    assert isinstance(failure, ParseFailure) and failure.format_match and failure.think == "why"


def test_invalid_box_entries_are_counted_not_kept():
    entries = (
        '[[1, 2, 3, 4], [1, 2, 3], ["1", 2, 3, 4], [1, 2, 3, NaN], [1, 2, 3, Infinity], [true, 2, 3, 4], '
        "[[1, 2, 3, 4]], [1e999, 0, 1, 1], [-5, 0, 1e30, 2], 7]"
    )
    parsed = _parsed(_answer(f'{{"keyframe_timestamp": -3, "bbox_2d_list": {entries}}}'))
    assert parsed.keyframe == -3  # any integer parses; the reward checks it against the sampled frames
    assert parsed.box_entries == 10 and parsed.valid_entries == 2
    assert parsed.boxes.tolist() == [[1, 2, 3, 4], [-5, 0, 1e30, 2]]


def test_huge_integers_never_raise():
    huge = "9" * 400
    parsed = _parsed(_answer(f'{{"keyframe_timestamp": {huge}, "bbox_2d_list": [[{huge}, 0, 1, 1]]}}'))
    assert parsed.keyframe == int(huge) and parsed.valid_entries == 0  # a box coordinate that overflows float
    too_long = "9" * 5000  # past Python's int-string limit
    assert _failure(_answer(f'{{"keyframe_timestamp": {too_long}, "bbox_2d_list": []}}')) == (
        ParseFailureReason.INVALID_JSON
    )


def test_deep_nesting_never_raises():
    deep = "[" * 100_000 + "]" * 100_000
    assert _failure(_answer(f'{{"keyframe_timestamp": 1, "bbox_2d_list": {deep}}}')) in (
        ParseFailureReason.INVALID_JSON,
        ParseFailureReason.BAD_BOX_LIST,
    )


def test_more_than_max_boxes_keeps_the_first_120():
    boxes = ", ".join(f"[{i}, {i}, {i + 1}, {i + 1}]" for i in range(130))
    parsed = _parsed(_answer(f'{{"keyframe_timestamp": 0, "bbox_2d_list": [{boxes}]}}'))
    assert parsed.box_entries == 130 and parsed.valid_entries == 130
    assert len(parsed.boxes) == MAX_BOXES == parsed.considered_entries
    assert parsed.boxes[-1].tolist() == [119, 119, 120, 120]
