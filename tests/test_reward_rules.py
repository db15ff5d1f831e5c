"""The reward rules: the release preset equals the release's reward file on docs/method.md's hand-worked cases and on
a fuzzed set of answers; each strict switch, turned on alone, changes exactly what its docstring says.

`release_reward` below is the release's scoring (`video_match_keyframe_sam_sft_mod.py`) written out step by step
as an independent oracle: its two regexes, `json.loads`, `int()` of the keyframe, one numpy array of the boxes,
the raw +1-pixel IoU, scipy's assignment, the propagator on every matched box, and a catch-all per part.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from veason_ray.answer_parsing import ParseFailureReason, parse_answer
from veason_ray.mask_propagation import MaskPropagator
from veason_ray.reward_rules import PRESETS, RELEASE_RULES, STRICT_RULES, RewardRules, reward_rules
from veason_ray.reward_scoring import score_response

FRAME_INDICES = [0, 5, 10, 15]
_TAGS = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


class PaintingPropagator(MaskPropagator):
    """Paints each box (rounded, clipped to the frame) on every frame: deterministic, and it raises on boxes it
    cannot paint (NaN or infinite), as a real tracker may."""

    def __init__(self) -> None:
        self.calls: list[np.ndarray] = []

    def propagate(self, frames: np.ndarray, keyframe_position: int, boxes: np.ndarray) -> np.ndarray:
        self.calls.append(np.array(boxes))
        height, width = frames.shape[1:3]
        masks = np.zeros(frames.shape[:3], dtype=bool)
        for x1, y1, x2, y2 in np.asarray(boxes, dtype=np.float64):
            left, top = max(int(round(x1)), 0), max(int(round(y1)), 0)
            right, bottom = min(int(round(x2)), width - 1), min(int(round(y2)), height - 1)
            masks[:, top : bottom + 1, left : right + 1] = True
        return masks


def _scene() -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Four 560x560 frames; object A (boxes 100..199) on frames 5-15, object B (300..339) on frames 10-15."""
    masks = np.zeros((4, 560, 560), dtype=bool)
    masks[1:, 100:200, 100:200] = True
    masks[2:, 300:340, 300:340] = True
    a, b = [100.5, 100.5, 199.5, 199.5], [300.5, 300.5, 339.5, 339.5]
    boxes = [np.zeros((1, 4)), np.array([a, [0, 0, 0, 0]]), np.array([a, b]), np.array([a, b])]
    return masks, boxes, np.zeros((4, 560, 560, 3), dtype=np.uint8)


# ---- the release's reward, step by step -------------------------------------------------------------------
def _release_format(text: str) -> float:
    tags = 1.0 if re.fullmatch(r"<think>.*?</think>\s*<answer>.*?</answer>", text, re.DOTALL) else 0.0
    part = 0.0
    try:
        match = re.search(r"<answer>\s*(\{.*?\})\s*</answer>", text, re.DOTALL)
        if match:
            data = json.loads(match.group(1))
            if (
                isinstance(data, dict)
                and isinstance(data.get("keyframe_timestamp"), int)
                and isinstance(data.get("bbox_2d_list"), list)
            ):
                boxes = data["bbox_2d_list"]
                n = len(boxes) if boxes else 1
                for box in boxes:
                    if (
                        isinstance(box, list)
                        and len(box) == 4
                        and all(isinstance(v, (int, float)) for v in box)
                    ):
                        part += 1.0 / n
    except Exception:  # noqa: BLE001 - the release's catch-all
        pass
    return tags + part


def _release_keyframe(text: str, gt_masks: np.ndarray) -> float:
    areas = (gt_masks > 0).sum(axis=(1, 2))
    if max(areas) <= 0:
        return 0.0
    try:
        match = re.search(r"<answer>\s*(.*?)\s*</answer>", text, re.DOTALL)
        if not match:
            return 0.0
        keyframe = int(json.loads(match.group(1)).get("keyframe_timestamp", -1))
        if keyframe not in FRAME_INDICES:
            return 0.0
        return max(0.0, min(1.0, areas[FRAME_INDICES.index(keyframe)] / max(areas)))
    except Exception:  # noqa: BLE001
        return 0.0


def _release_iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    x11, y11, x12, y12 = np.split(pred, 4, axis=1)
    x21, y21, x22, y22 = np.split(gt, 4, axis=1)
    inter = np.maximum(0, np.minimum(x12, x22.T) - np.maximum(x11, x21.T) + 1) * np.maximum(
        0, np.minimum(y12, y22.T) - np.maximum(y11, y21.T) + 1
    )
    union = (x12 - x11 + 1) * (y12 - y11 + 1) + ((x22 - x21 + 1) * (y22 - y21 + 1)).T - inter
    return inter / union


def _release_accuracy(text, gt_masks, gt_boxes, frames, propagator) -> tuple[float, float]:
    spatial = consistency = 0.0
    with np.errstate(all="ignore"):
        try:
            match = re.search(r"<answer>\s*(.*?)\s*</answer>", text, re.DOTALL)
            if match:
                data = json.loads(match.group(1))
                keyframe = int(data.get("keyframe_timestamp", -1))
                if keyframe not in FRAME_INDICES:
                    return 0.0, 0.0
                position = FRAME_INDICES.index(keyframe)
                pred = np.array([item for item in data["bbox_2d_list"]][:120])
                gt = np.array(gt_boxes[position].tolist()[:120])
                cost = 1.0 - _release_iou(pred, gt).astype(float)
                rows, cols = linear_sum_assignment(cost)
                spatial = (len(rows) * 1.0 - cost[rows, cols].sum()) / max(len(pred), len(gt))
                masks = propagator.propagate(frames, position, pred[rows].astype(np.float32))
                ious = [
                    1.0 if not (p | g).any() else (p & g).sum() / (p | g).sum()
                    for p, g in zip(masks, gt_masks, strict=False)
                ]
                consistency = sum(ious) / len(masks)
        except Exception:  # noqa: BLE001
            pass
    return float(spatial), float(consistency)


def release_reward(text: str) -> dict[str, float]:
    gt_masks, gt_boxes, frames = _scene()
    spatial, consistency = _release_accuracy(text, gt_masks, gt_boxes, frames, PaintingPropagator())
    return {
        "format": _release_format(text),
        "keyframe": _release_keyframe(text, gt_masks),
        "accuracy": spatial + consistency,
    }


def ours(text: str, rules: RewardRules = RELEASE_RULES, propagator: MaskPropagator | None = None):
    gt_masks, gt_boxes, frames = _scene()
    return score_response(
        text,
        frame_indices=FRAME_INDICES,
        gt_masks=gt_masks,
        gt_boxes=gt_boxes,
        frames=frames,
        propagator=propagator or PaintingPropagator(),
        rules=rules,
    )


def _assert_release_equal(text: str) -> None:
    want, got = release_reward(text), ours(text)
    have = {
        "format": got.parts["format"],
        "keyframe": got.parts["keyframe"],
        "accuracy": got.parts["spatial"] + got.parts["consistency"],
    }
    assert have == pytest.approx(want, abs=1e-9), text
    assert got.total == pytest.approx(sum(want.values()), abs=1e-9), text


def answer(keyframe: object, boxes: object, think: str = "t", extra: dict | None = None) -> str:
    body = {"keyframe_timestamp": keyframe, "bbox_2d_list": boxes, **(extra or {})}
    return f"<think>{think}</think><answer>{json.dumps(body)}</answer>"


A, B = [100, 100, 199, 199], [300, 300, 339, 339]


# ---- docs/method.md's hand-worked cases ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected_total"),
    [
        (answer(10, [A, B]), None),  # both objects on the frame where both are largest
        (answer(5, [A]), None),  # one object, the other absent on frame 5
        (answer(10, []), 1.0 + 1.0),  # empty list: the tag point and the keyframe (no entry adds)
        (answer(7, [A]), 2.0),  # not a sampled frame: format only
        ("<think>t</think><answer>frame 5</answer>", 1.0),  # does not parse: tags only
        ("no tags at all", 0.0),
    ],
)
def test_release_preset_equals_the_release_on_the_hand_worked_cases(text, expected_total):
    _assert_release_equal(text)
    if expected_total is not None:
        assert ours(text).total == pytest.approx(expected_total)


def test_a_perfect_answer_scores_the_same_under_both_presets():
    gt_masks, gt_boxes, frames = _scene()
    # frame 10 and 15 hold both objects; the frame-0 GT is empty, so a painted mask there costs consistency
    for rules in PRESETS.values():
        result = ours(answer(10, [A, B]), rules)
        assert result.parts["format"] == 2.0 and result.parts["keyframe"] == 1.0
        assert result.parts["spatial"] > 0.95  # the GT boxes carry the release's +0.5 px


# ---- fuzz: answers built from the release's rules ------------------------------------------------------------
def _fuzzed_answers(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    numbers = [0, 5, 10, 15, 7, -1, 3.7, 10.0, "10", True, False, None, math.nan, math.inf, 10**20]
    coords = [100, 199, 300, 339, 0, 560, 600, -20, 150.5, True, math.nan, math.inf, -math.inf, "5", None]

    def box() -> object:
        kind = rng.random()
        if kind < 0.55:  # a jittered box around one of the objects, sometimes off the frame or inverted
            x1, y1, x2, y2 = rng.choice([A, B, [0, 0, 0, 0], [540, 540, 620, 610]])
            jitter = [rng.choice([0, 0, 5, -15, 30, -120]) for _ in range(4)]
            out = [x1 + jitter[0], y1 + jitter[1], x2 + jitter[2], y2 + jitter[3]]
            return out if rng.random() < 0.9 else out[::-1]
        if kind < 0.8:
            return [rng.choice(coords) for _ in range(4)]
        # (not [] or 8 numbers: see test_entries_numpy_broadcasts_are_malformed_here)
        return rng.choice([[1, 2, 3], [1, 2, 3, 4, 5], "box", {"x": 1}, [[1, 2, 3, 4]], [None] * 4])

    def body() -> str:
        data: dict = {}
        if rng.random() < 0.93:
            data["keyframe_timestamp"] = rng.choice(numbers)
        if rng.random() < 0.93:
            data["bbox_2d_list"] = (
                [box() for _ in range(rng.choice([0, 1, 1, 2, 2, 3]))]
                if rng.random() < 0.9
                else rng.choice(["none", {"a": 1}, 3])
            )
        text = json.dumps(data)
        roll = rng.random()
        if roll < 0.08:
            text = f"```json\n{text}\n```"
        elif roll < 0.14:
            text = text.replace('"', "'")
        elif roll < 0.18:
            text = f"{text} trailing words"
        elif roll < 0.21:
            text = f"[{text}]"
        return text

    texts = []
    for _ in range(count):
        inner = body()
        think = rng.choice(["t", "look at frame 5", f"draft <answer>{body()}</answer>", ""])
        text = f"<think>{think}</think>{rng.choice(['', ' ', chr(10)])}<answer>{inner}</answer>"
        roll = rng.random()
        if roll < 0.06:
            text += f"<answer>{body()}</answer>"
        elif roll < 0.1:
            text = text.replace("<think>", "", 1)
        elif roll < 0.13:
            text = text.replace("</answer>", "", 1)
        elif roll < 0.16:
            text += "\n"
        texts.append(text)
    return texts


def test_release_preset_equals_the_release_on_fuzzed_answers():
    texts = _fuzzed_answers(1000)
    for text in texts:
        _assert_release_equal(text)
    # the fuzz reaches the cases the rules are about
    parsed = [parse_answer(t, RELEASE_RULES) for t in texts]
    assert sum(getattr(p, "boxes_scored", False) for p in parsed) > 200
    assert sum(not getattr(p, "boxes_scored", True) for p in parsed) > 60
    assert sum(_TAGS.fullmatch(t) is None for t in texts) > 60


# ---- each strict switch, on alone ---------------------------------------------------------------------------
def _only(switch: str) -> RewardRules:
    return dataclasses.replace(RELEASE_RULES, **{switch: True})


def test_every_switch_is_off_in_release_and_on_in_strict():
    names = [f.name for f in dataclasses.fields(RewardRules)]
    assert not any(getattr(RELEASE_RULES, n) for n in names) and all(getattr(STRICT_RULES, n) for n in names)
    assert reward_rules("release").name == "release" and _only("clip_boxes").name == "custom"
    with pytest.raises(ValueError, match="reward.rules"):
        reward_rules("paper")


def test_lenient_json_reads_fences_single_quotes_and_surrounding_text():
    fenced = "<think>t</think><answer>```json\n" + json.dumps({"keyframe_timestamp": 10, "bbox_2d_list": [A]})
    fenced += "\n```</answer>"
    release, lenient = ours(fenced), ours(fenced, _only("lenient_json"))
    assert release.parts == {"format": 1.0, "keyframe": 0.0, "spatial": 0.0, "consistency": 0.0}
    assert release.parse_failure == ParseFailureReason.INVALID_JSON
    assert (
        lenient.parts["format"] == 2.0 and lenient.parts["keyframe"] == 1.0 and lenient.parts["spatial"] > 0.4
    )


def test_answer_after_think_skips_an_answer_written_inside_the_thinking():
    draft = '<answer>{"keyframe_timestamp": 0, "bbox_2d_list": []}</answer>'
    text = f"<think>maybe {draft}</think><answer>{json.dumps({'keyframe_timestamp': 10, 'bbox_2d_list': [A]})}</answer>"
    release, after = ours(text), ours(text, _only("answer_after_think"))
    assert release.parts["keyframe"] == 0.0 and release.parts["spatial"] == 0.0  # read the draft: frame 0
    assert after.parts["keyframe"] == 1.0 and after.parts["spatial"] > 0.4


def test_integer_keyframe_refuses_floats_strings_and_bools():
    for keyframe in (10.0, 10.9, "10"):
        release, strict = ours(answer(keyframe, [A])), ours(answer(keyframe, [A]), _only("integer_keyframe"))
        assert release.parts["format"] == 1.0  # the format part wants an int either way
        assert release.parts["keyframe"] == 1.0 and release.parts["spatial"] > 0.4  # int(10.9) == 10
        assert strict.parse_failure == ParseFailureReason.BAD_KEYFRAME and strict.total == 1.0
    # a bool is an int to the format part and to int(): True is frame 1, not sampled
    assert ours(answer(True, [A])).parts["format"] == 2.0
    assert ours(answer(True, [A]), _only("integer_keyframe")).parts["format"] == 1.0


def test_finite_box_numbers_refuses_nan_infinity_and_bools_as_coordinates():
    for bad in ([math.nan, 100, 199, 199], [100, 100, math.inf, 199], [True, 100, 199, 199]):
        text = answer(10, [bad])
        assert ours(text).parts["format"] == 2.0  # the release counts it as well formed
        assert ours(text, _only("finite_box_numbers")).parts["format"] == 1.0
    # NaN makes the release's matching raise: no spatial, no consistency
    nan = ours(answer(10, [[math.nan, 100, 199, 199]]))
    assert nan.parts["spatial"] == 0.0 and nan.parts["consistency"] == 0.0


def test_drop_malformed_boxes_keeps_the_good_ones():
    text = answer(10, [A, [1, 2, 3]])
    release, dropped = ours(text), ours(text, _only("drop_malformed_boxes"))
    assert release.parts["spatial"] == 0.0 and release.parts["consistency"] == 0.0
    assert release.parts["keyframe"] == 1.0 and release.parts["format"] == 1.5
    assert dropped.parts["spatial"] == pytest.approx(
        ours(answer(10, [A, [0, 0, 0, 0]]), STRICT_RULES).parts["spatial"]
    )
    assert dropped.parts["consistency"] > 0
    # without a box list the release still scores the keyframe; the switch makes it a parse failure
    missing = '<think>t</think><answer>{"keyframe_timestamp": 10}</answer>'
    assert ours(missing).parts["keyframe"] == 1.0
    assert ours(missing, _only("drop_malformed_boxes")).parse_failure == ParseFailureReason.BAD_BOX_LIST


def test_clip_boxes_clips_before_iou_and_before_the_propagator():
    gt_masks, gt_boxes, frames = _scene()
    off_frame = [-10.5, -10.5, 199.5, 199.5]  # object A's box grown past the frame's corner
    gt_boxes[2] = np.array([[0.5, 0.5, 199.5, 199.5]])
    propagator = PaintingPropagator()
    kwargs = dict(frame_indices=FRAME_INDICES, gt_masks=gt_masks, gt_boxes=gt_boxes, frames=frames)
    release = score_response(answer(10, [off_frame]), propagator=propagator, **kwargs)
    clipped = score_response(
        answer(10, [off_frame]), propagator=propagator, rules=_only("clip_boxes"), **kwargs
    )
    assert release.parts["spatial"] == pytest.approx(200 * 200 / (211 * 211))
    assert clipped.parts["spatial"] == pytest.approx(200 * 200 / (200.5 * 200.5))
    assert propagator.calls[0].tolist() == [off_frame] and propagator.calls[1].tolist() == [
        [0, 0, 199.5, 199.5]
    ]
    # an inverted box goes to the propagator as given, or is dropped
    propagator.calls.clear()
    score_response(answer(10, [[199, 199, 100, 100]]), propagator=propagator, **kwargs)
    score_response(
        answer(10, [[199, 199, 100, 100]]), propagator=propagator, rules=_only("clip_boxes"), **kwargs
    )
    assert len(propagator.calls) == 1


def test_score_empty_box_list_scores_empty_masks():
    release, scored = ours(answer(10, [])), ours(answer(10, []), _only("score_empty_box_list"))
    assert release.parts["consistency"] == 0.0
    assert scored.parts["consistency"] == 0.25  # only frame 0 has no GT: empty agrees with empty there
    assert scored.consistency_error is None


def test_entries_numpy_broadcasts_are_malformed_here():
    """The one place the release preset departs from the release (docs/method.md): when every entry is an
    empty list, or every entry holds 8 or 12 numbers, the release's `np.split(boxes, 4, axis=1)` does not fail
    and its IoU broadcasts into an accidental score; we count such entries as malformed."""
    for keyframe, boxes in ((0, [[]]), (10, [[100, 100, 199, 199, 100, 100, 199, 199]])):
        text = answer(keyframe, boxes)
        assert release_reward(text)["accuracy"] > 0
        assert ours(text).parts["spatial"] == 0.0 and ours(text).parts["consistency"] == 0.0
