"""Fuzz: random and mutated answers through the parser and every reward term, under both reward rules: 10,500 by
default, 100,000 in the slow test (docs/reliability.md). Every total is the sum of its terms, every term in its
range, nothing raises."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from veason_ray.answer_parsing import ParsedAnswer, parse_answer
from veason_ray.mask_propagation import MaskPropagator
from veason_ray.reward_rules import PRESETS
from veason_ray.reward_scoring import score_response
from veason_ray.rewards import REWARD_TERMS

FRAME_INDICES = (0, 7, 14, 21, 28, 35)
CASES = 10_500


class ChaosPropagator(MaskPropagator):
    """Box masks on every frame, except that it sometimes fails, returns the wrong shape or returns floats."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def propagate(self, frames: np.ndarray, keyframe_position: int, boxes: np.ndarray) -> np.ndarray:
        roll = self.rng.random()
        if roll < 0.03:
            raise RuntimeError("propagation failed")
        if roll < 0.05:
            return np.zeros((1, 2, 3), dtype=bool)
        masks = np.zeros(frames.shape[:3], dtype=np.float32 if roll < 0.1 else bool)
        for x1, y1, x2, y2 in np.clip(np.round(boxes), 0, frames.shape[2]).astype(int):
            masks[:, y1 : y2 + 1, x1 : x2 + 1] = np.nan if roll < 0.07 else 1
        return masks


def _random_json(rng: np.random.Generator, depth: int = 0) -> object:
    kind = rng.integers(0, 9 if depth < 3 else 6)
    if kind == 0:
        return int(rng.integers(-(10**6), 10**6))
    if kind == 1:
        return float(rng.normal() * 10 ** rng.integers(0, 300))
    if kind == 2:
        return "".join(chr(int(c)) for c in rng.integers(32, 0x2FFF, size=rng.integers(0, 8)))
    if kind == 3:
        return bool(rng.integers(0, 2))
    if kind == 4:
        return None
    if kind == 5:
        return [float(v) for v in rng.uniform(-50, 700, size=4)]
    if kind in (6, 7):
        return [_random_json(rng, depth + 1) for _ in range(rng.integers(0, 5))]
    keys = ["keyframe_timestamp", "bbox_2d_list", "x", "bbox_2d"]
    return {str(rng.choice(keys)): _random_json(rng, depth + 1) for _ in range(rng.integers(0, 4))}


def _valid_answer(rng: np.random.Generator, gt_boxes: list[np.ndarray]) -> str:
    count = int(rng.choice([0, 1, 2, 3, 125]))
    corners = rng.uniform(0, 560, size=(count, 2))
    sizes = rng.uniform(0, 200, size=(count, 2))
    boxes = np.concatenate([corners, corners + sizes], axis=1).round(2).tolist()
    keyframe = int(rng.choice(FRAME_INDICES)) if rng.random() < 0.8 else int(rng.integers(-5, 50))
    if keyframe in FRAME_INDICES and rng.random() < 0.4:  # near the truth, to reach high totals too
        truth = gt_boxes[FRAME_INDICES.index(keyframe)] + rng.normal(0, 3, size=(1, 4))
        boxes = truth.round(2).tolist()
    think = "".join(chr(int(c)) for c in rng.integers(32, 0x1FFFF, size=rng.integers(0, 40)))
    answer = json.dumps(
        {"keyframe_timestamp": keyframe, "bbox_2d_list": boxes}, ensure_ascii=bool(rng.random() < 0.5)
    )
    return f"<think>{think}</think>{rng.choice(['', chr(10), '  '])}<answer>{answer}</answer>"


def _mutate(text: str, rng: np.random.Generator) -> str:
    kind = int(rng.integers(0, 16))
    if kind == 0:  # truncate
        return text[: int(rng.integers(0, len(text) + 1))]
    if kind == 1:  # swap or break tags
        pairs = [
            ("<think>", "<answer>"),
            ("</think>", "</answer>"),
            ("<answer>", ""),
            ("</answer>", "</ answer>"),
        ]
        old, new = pairs[int(rng.integers(0, len(pairs)))]
        return text.replace(old, new, int(rng.integers(1, 3)))
    if kind == 2:  # random JSON in the answer
        return f"<think>x</think><answer>{json.dumps(_random_json(rng))}</answer>"
    if kind == 3:  # single quotes
        return text.replace('"', "'")
    if kind == 4:  # code fence
        return text.replace("<answer>", "<answer>```json\n").replace("</answer>", "\n```</answer>")
    if kind == 5:  # NaN / Infinity
        return text.replace(str(rng.integers(0, 10)), rng.choice(["NaN", "Infinity", "-Infinity"]), 2)
    if kind == 6:  # nested lists
        return text.replace("[[", "[[[", 1).replace("]]", "]]]", 1)
    if kind == 7:  # huge numbers
        return text.replace(str(rng.integers(0, 10)), rng.choice(["1e308", "1e999", "9" * 60, "-1e400"]), 3)
    if kind == 8:  # negative ids
        return text.replace('"keyframe_timestamp": ', '"keyframe_timestamp": -', 1)
    if kind == 9:  # strings for numbers
        return text.replace(", ", '", "').replace("[", '["', 2)
    if kind == 10:  # unicode anywhere
        position = int(rng.integers(0, len(text) + 1))
        noise = "".join(chr(int(c)) for c in rng.integers(0, 0x10FFFF, size=5) if not 0xD800 <= c < 0xE000)
        return text[:position] + noise + text[position:]
    if kind == 11:  # random byte-level edits
        chars = list(text)
        for _ in range(int(rng.integers(1, 6))):
            if chars:
                chars[int(rng.integers(0, len(chars)))] = chr(int(rng.integers(0, 128)))
        return "".join(chars)
    if kind == 12:  # text around the whole response
        return rng.choice(["Sure! ", "", "\n"]) + text + rng.choice(["", "\n", " Done.", "<|im_end|>"])
    if kind == 13:  # keyframe as float or bool
        return text.replace(
            '"keyframe_timestamp": ', '"keyframe_timestamp": ' + rng.choice(['1.5, "_": ', 'true, "_": ']), 1
        )
    if kind == 14:  # duplicated blocks
        return text + text
    return text


def _responses(rng: np.random.Generator, gt_boxes: list[np.ndarray], cases: int):
    odd_inputs = [None, b"<think></think><answer>{}</answer>", 42, ["<think>"], {"answer": 1}, "", "<", "{}"]
    yield from odd_inputs
    for _ in range(cases - len(odd_inputs)):
        text = _valid_answer(rng, gt_boxes)
        for _ in range(int(rng.integers(0, 4))):
            text = _mutate(text, rng)
        yield text


def _scene(rng: np.random.Generator):
    size = 56  # GT masks and frames at a tenth of 560 keep the fuzz fast; boxes stay in 560 space
    gt_masks = np.zeros((len(FRAME_INDICES), size, size), dtype=bool)
    gt_boxes = []
    for t in range(len(FRAME_INDICES)):
        if rng.random() < 0.2:
            gt_boxes.append(np.zeros((1, 4)))
            continue
        x, y = rng.integers(0, size - 10, size=2)
        gt_masks[t, y : y + 10, x : x + 10] = True
        gt_boxes.append(np.array([[x * 10 + 0.5, y * 10 + 0.5, (x + 9) * 10 + 0.5, (y + 9) * 10 + 0.5]]))
    frames = np.zeros((len(FRAME_INDICES), size, size, 3), dtype=np.uint8)
    return gt_masks, gt_boxes, frames


@pytest.mark.parametrize(
    ("cases", "seconds"),
    [(CASES, 30.0), pytest.param(100_000, 300.0, marks=pytest.mark.slow)],
    ids=["10k", "100k"],
)
def test_fuzz_rewards_stay_in_range_and_never_raise(cases, seconds):
    rng = np.random.default_rng(20260101)
    gt_masks, gt_boxes, frames = _scene(rng)
    propagator = ChaosPropagator(rng)
    start = time.perf_counter()
    parsed_count = scored = 0
    weights = {name: 1.0 for name in REWARD_TERMS}  # every term scored
    presets = list(PRESETS.values())
    for index, response in enumerate(_responses(rng, gt_boxes, cases)):
        rules = presets[index % len(presets)]
        parsed = parse_answer(response, rules)
        parsed_count += isinstance(parsed, ParsedAnswer)
        result = score_response(
            response,
            frame_indices=FRAME_INDICES,
            gt_masks=gt_masks,
            gt_boxes=gt_boxes,
            frames=frames,
            propagator=propagator,
            weights=weights,
            rules=rules,
        )
        assert list(result.parts) == list(REWARD_TERMS), (response, result)
        for name, value in result.parts.items():
            low, high = REWARD_TERMS[name].bounds
            assert math.isfinite(value) and low <= value <= high, (name, response, result)
        assert math.isclose(result.total, sum(result.parts.values())), (response, result)
        if result.parse_failure is not None:
            assert all(v == 0.0 for name, v in result.parts.items() if name != "format"), (response, result)
        scored += 1
    assert scored == cases
    assert 0.2 * scored < parsed_count < 0.95 * scored  # the mutations reach both sides of the parser
    assert time.perf_counter() - start < seconds
