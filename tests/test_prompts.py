"""The user turn, the instruction and the answer schema."""

from __future__ import annotations

import numpy as np

from veason_ray.answer_parsing import ParsedAnswer, parse_answer
from veason_ray.prompts import (
    ANSWER_SCHEMA,
    SYSTEM_PROMPT,
    build_messages,
    build_user_content,
    render_answer,
    render_instruction,
)

RELEASE_TEXT = (
    "You are given 3 frames uniformly sampled from a 1 FPS video. Each image is preceded by its timestamp.\n"
    "Given the following expression: 'the dog on the left', identify the timestamp where the target is best "
    "represented. Then, locate the target in that frame by predicting the bounding box(es).\n"
    "First, output the thinking process in <think> </think> tags, and then output the result in the following "
    "format within <answer> </answer> tags."
)


def test_user_turn_interleaves_timestamps_and_frames_then_instruction():
    content = build_user_content([0, 5, 12], "The dog on the left.")
    assert [item["type"] for item in content] == ["text", "image"] * 3 + ["text"]
    assert [content[i]["text"] for i in (0, 2, 4)] == ["(0s)", "(5s)", "(12s)"]
    assert all("image" not in content[i] for i in (1, 3, 5))
    instruction = content[-1]["text"]
    assert instruction.startswith("\n") and "'the dog on the left'" in instruction
    assert ANSWER_SCHEMA in instruction and "3 frames" in instruction


def test_frames_are_attached_in_order():
    frames = [np.full((560, 560, 3), value, dtype=np.uint8) for value in (1, 2)]
    content = build_user_content([3, 9], "cat", frames=frames)
    assert content[1]["image"] is frames[0] and content[3]["image"] is frames[1]


def test_release_instruction_word_for_word():
    assert render_instruction("  The dog on the left. ", 3, include_answer_schema=False) == RELEASE_TEXT
    assert render_instruction("The dog on the left.", 3).startswith(RELEASE_TEXT)


def test_messages_have_the_system_prompt():
    messages = build_messages([0], "x")
    assert SYSTEM_PROMPT == "You are a helpful assistant."
    assert messages[0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert messages[1]["role"] == "user" and messages[1]["content"][0] == {"type": "text", "text": "(0s)"}


def test_rendered_answer_parses_back():
    text = render_answer("the dog is biggest at 12s", 12, [[1.234, 2, 3.999, 4], [10, 20, 30, 40]])
    assert text.startswith("<think>the dog is biggest at 12s</think>\n<answer>")
    parsed = parse_answer(text)
    assert isinstance(parsed, ParsedAnswer) and parsed.format_match
    assert parsed.keyframe == 12 and parsed.boxes.tolist() == [[1.23, 2, 4.0, 4], [10, 20, 30, 40]]
