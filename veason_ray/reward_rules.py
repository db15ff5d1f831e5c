"""How an answer is read and scored where the release and we differ: named switches, two presets.

Veason-R1's release scores answers with its reward file (`verl/utils/reward_score/
video_match_keyframe_sam_sft_mod.py`); our rules agree with it on well-formed answers whose boxes lie inside
the frame and differ elsewhere. Each difference is one switch here, read in one place (answer_parsing.py or
rewards.py); `reward.rules` picks a preset. docs/method.md ("Reward rules") gives each switch's reason.

- "release" (the default): every switch off, the release's reward on every answer, so numbers compare with
  the paper's.
- "strict": every switch on, our stricter reading (it never lets a NaN box or a boolean keyframe score).
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class RewardRules:
    """One reading of answers. Off = the release's behaviour; on = ours."""

    # The answer's JSON is read leniently: a code fence or any text around the first `{...}`, single quotes.
    # Off: `json.loads` of the block exactly (the format part reads `<answer>\s*({...})\s*</answer>`).
    lenient_json: bool
    # The answer block is the first <answer>...</answer> after </think>. Off: the first anywhere, even one
    # written inside the thinking.
    answer_after_think: bool
    # keyframe_timestamp must be a JSON integer (not a bool, float or string). Off: the format part accepts
    # any JSON integer or bool, the other parts read `int(value)` (3.7 -> 3, "5" -> 5, a missing one -> -1).
    integer_keyframe: bool
    # A box entry counts as well-formed only with 4 finite numbers, bools excluded. Off: 4 ints, floats or
    # bools, NaN and Infinity included.
    finite_box_numbers: bool
    # Malformed box entries are dropped and count as predictions that match nothing. Off: one malformed entry
    # (or a missing bbox_2d_list) makes the spatial and consistency parts 0.
    drop_malformed_boxes: bool
    # Predicted boxes are clipped to the 560x560 frame before IoU and before SAM2, and a box with x2 < x1 or
    # y2 < y1 is no box. Off: IoU of the raw coordinates with the +1 pixel convention; every matched box goes
    # to SAM2.
    clip_boxes: bool
    # An empty bbox_2d_list scores the consistency of empty masks (1 where the GT is empty too). Off: 0.
    score_empty_box_list: bool

    @property
    def name(self) -> str:
        return next((name for name, preset in PRESETS.items() if preset == self), "custom")


RELEASE_RULES = RewardRules(**{f.name: False for f in fields(RewardRules)})
STRICT_RULES = RewardRules(**{f.name: True for f in fields(RewardRules)})
PRESETS: dict[str, RewardRules] = {"release": RELEASE_RULES, "strict": STRICT_RULES}


def reward_rules(name: str) -> RewardRules:
    """The preset called `name` ("release" or "strict")."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"reward.rules: unknown {name!r}; one of {', '.join(PRESETS)}") from None
