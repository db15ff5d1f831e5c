"""CoT-SFT pieces on plain data: the training sequence of a record, the held-out split, the step schedule, the
learning-rate schedule, the loss and the answer-format evaluation. `pipelines/sft.py` runs them on Ray Train ranks.

The sequence: the prompt is `encode_prompt` of the record's messages (the rollout engine's chat template and
image preprocessing); the response is the assistant answer's tokens followed by `<|im_end|>`. The chat
template writes `<|im_end|>\\n` after an assistant turn, but generation stops at `<|im_end|>` (the eos), so the
newline is never predicted at inference and is left out: the response is exactly what a rollout of a perfect
policy samples, and the model learns to stop.

The learning rate warms up linearly, then decays along a cosine towards zero at the last step (LLaMA-Factory's default
for SFT). A constant rate leaves a small model on a plateau where greedy decoding still slips (a second decimal
point in a number, a repeated phrase); the decay settles it.

The loss is the token mean over the global batch: the summed NLL of all answer tokens of all ranks divided by
their count, so every answer token weighs the same whatever the split into ranks and micro-batches.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from veason_ray.answer_parsing import ParsedAnswer, ParseFailure, parse_answer
from veason_ray.rewards import format_reward, spatial_reward
from veason_ray.training.sequences import PolicySequence, encode_prompt

END_OF_TURN = "<|im_end|>"
SAMPLES_KEPT = 3


def response_ids(tokenizer: Any, answer: str) -> torch.Tensor:
    """(R,) the answer's tokens then `<|im_end|>`: the assistant turn as the chat template renders it, without
    the newline that follows the end token."""
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    return torch.tensor([*ids, end], dtype=torch.long)


def sft_sequence(processor: Any, messages: Sequence[dict[str, Any]], answer: str) -> PolicySequence:
    """The training sequence of one example (prompt messages in our chat-content format, answer text)."""
    return PolicySequence(
        prompt=encode_prompt(processor, messages), response_ids=response_ids(processor.tokenizer, answer)
    )


def empty_like(sequence: PolicySequence) -> PolicySequence:
    """A copy with no response tokens: a rank short of examples runs it so every rank takes as many
    micro-batches (ZeRO's collectives run in step); it adds nothing to the loss."""
    return PolicySequence(prompt=sequence.prompt, response_ids=sequence.response_ids[:0])


def split_held_out(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices) of `count` records: a seeded random `fraction` held out (at least one
    when the fraction is > 0 and there are >= 2 records), both sorted."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"sft.held_out_fraction must be in [0, 1), got {fraction}")
    order = list(range(count))
    random.Random(seed).shuffle(order)
    held = round(count * fraction)
    if fraction > 0 and count >= 2:
        held = max(1, held)
    return sorted(order[held:]), sorted(order[:held])


def step_schedule(
    num_examples: int, batch_size: int, epochs: int, seed: int, min_batch: int = 1
) -> list[list[int]]:
    """Per optimizer step, the example positions (0..num_examples-1) of its global batch: each epoch a fresh
    seeded shuffle cut into batches of `batch_size`. An epoch's last, short batch is kept when it holds at
    least `min_batch` examples (the rank count: every rank needs one) and dropped otherwise; the next
    epoch's shuffle differs, so no example is left out for good."""
    if batch_size < max(1, min_batch) or epochs < 0:
        raise ValueError(
            f"sft.batch_size must be >= {max(1, min_batch)} (one example per rank) and sft.epochs >= 0, "
            f"got {batch_size}, {epochs}"
        )
    if num_examples < min_batch:
        raise ValueError(f"{num_examples} training examples for {min_batch} ranks: need one per rank")
    steps: list[list[int]] = []
    for epoch in range(epochs):
        order = list(range(num_examples))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        batches = [order[i : i + batch_size] for i in range(0, num_examples, batch_size)]
        steps += [b for b in batches if len(b) >= min_batch]
    return steps


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """The lr multiplier of optimizer step `step` (0-based) of `total_steps`: (step + 1) / warmup_steps during
    the warm-up, then 0.5 * (1 + cos(pi * progress)) with progress going from 0 (first step after the warm-up)
    towards 1 (step `total_steps`, one past the last)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def rank_share(batch: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This rank's examples of a global batch (round robin, so shares differ by at most one)."""
    return list(batch[rank::world_size])


def summed_nll(logprobs: torch.Tensor, mask: torch.Tensor, normalizer: float) -> torch.Tensor:
    """sum(-logprobs * mask) / normalizer: this micro-batch's part of the global token-mean NLL."""
    return -(logprobs * mask).sum() / max(normalizer, 1.0)


@dataclass
class FormatScore:
    """Answer-format statistics of generated answers: parse_rate (share that `parse_answer` accepts),
    format_match_rate (share whose whole text matches the tag regex), format_reward_mean (in [0, 2]) and
    keyframe_in_prompt_rate (share that parses with a keyframe among its prompt's frame indices: the model reads
    the timestamps it was shown; any other keyframe scores 0 on keyframe, spatial and consistency).

    Grounding, against the teacher's answer in the record: teacher_keyframe_rate (share choosing the teacher's
    keyframe) and teacher_box_iou_mean (the spatial reward's Hungarian-matched IoU of the answer's boxes to the
    teacher's, counted only when the keyframe is the teacher's, 0 otherwise): whether the model looks where
    the targets are, which the format alone does not say."""

    examples: int
    parsed: int
    format_match: int
    format_reward_sum: float
    keyframe_in_prompt: int = 0
    teacher_keyframe: int = 0
    teacher_box_iou_sum: float = 0.0
    failures: dict[str, int] = field(default_factory=dict)  # ParseFailureReason value -> count
    samples: list[str] = field(default_factory=list)  # the first few answers, for a look at what went wrong

    @property
    def parse_rate(self) -> float:
        return self.parsed / self.examples if self.examples else 0.0

    @property
    def format_match_rate(self) -> float:
        return self.format_match / self.examples if self.examples else 0.0

    @property
    def format_reward_mean(self) -> float:
        return self.format_reward_sum / self.examples if self.examples else 0.0

    @property
    def keyframe_in_prompt_rate(self) -> float:
        return self.keyframe_in_prompt / self.examples if self.examples else 0.0

    @property
    def teacher_keyframe_rate(self) -> float:
        return self.teacher_keyframe / self.examples if self.examples else 0.0

    @property
    def teacher_box_iou_mean(self) -> float:
        return self.teacher_box_iou_sum / self.examples if self.examples else 0.0

    def counts(self) -> list[float]:
        """The summable fields in constructor order (what ranks all-reduce); `from_counts` inverts it."""
        return [
            self.examples,
            self.parsed,
            self.format_match,
            self.format_reward_sum,
            self.keyframe_in_prompt,
            self.teacher_keyframe,
            self.teacher_box_iou_sum,
        ]

    @classmethod
    def from_counts(cls, counts: Sequence[float]) -> FormatScore:
        e, p, m, reward, shown, teacher, iou = counts
        return cls(int(e), int(p), int(m), float(reward), int(shown), int(teacher), float(iou))

    def as_dict(self) -> dict[str, float]:
        return {
            "examples": self.examples,
            "parse_rate": self.parse_rate,
            "format_match_rate": self.format_match_rate,
            "format_reward_mean": self.format_reward_mean,
            "keyframe_in_prompt_rate": self.keyframe_in_prompt_rate,
            "teacher_keyframe_rate": self.teacher_keyframe_rate,
            "teacher_box_iou_mean": self.teacher_box_iou_mean,
            "failures": dict(self.failures),
            "samples": list(self.samples),
        }

    def __add__(self, other: FormatScore) -> FormatScore:
        summed = FormatScore.from_counts([a + b for a, b in zip(self.counts(), other.counts(), strict=True)])
        summed.failures = dict(Counter(self.failures) + Counter(other.failures))
        summed.samples = (self.samples + other.samples)[:SAMPLES_KEPT]
        return summed


def teacher_box_iou(answer: ParsedAnswer | ParseFailure, reference: dict[str, Any]) -> float:
    """The spatial reward of `answer`'s boxes against the teacher's (`reference`: a record's "veason" block with
    keyframe and boxes_560) when it chose the teacher's keyframe; 0 otherwise."""
    if not isinstance(answer, ParsedAnswer) or answer.keyframe != int(reference["keyframe"]):
        return 0.0
    teacher = np.asarray(reference["boxes_560"], dtype=np.float64).reshape(-1, 4)
    return spatial_reward(answer.boxes, teacher, answer.considered_entries).reward


def score_answers(answers: Sequence[str], references: Sequence[dict[str, Any]] | None = None) -> FormatScore:
    """The format statistics of decoded answers; `references`: each answer's record "veason" block
    (frame_indices, keyframe, boxes_560) for the keyframe and grounding counts (0 without them)."""
    parsed = [parse_answer(a) for a in answers]
    score = FormatScore(
        examples=len(answers),
        parsed=sum(isinstance(p, ParsedAnswer) for p in parsed),
        format_match=sum(p.format_match for p in parsed),
        format_reward_sum=sum(format_reward(p) for p in parsed),
        failures=dict(Counter(p.reason.value for p in parsed if isinstance(p, ParseFailure))),
        samples=list(answers[:SAMPLES_KEPT]),
    )
    if references is None:
        return score
    pairs = list(zip(parsed, references, strict=True))
    score.keyframe_in_prompt = sum(
        isinstance(p, ParsedAnswer) and p.keyframe in ref["frame_indices"] for p, ref in pairs
    )
    score.teacher_keyframe = sum(
        isinstance(p, ParsedAnswer) and p.keyframe == ref["keyframe"] for p, ref in pairs
    )
    score.teacher_box_iou_sum = sum(teacher_box_iou(p, ref) for p, ref in pairs)
    return score


def generate_answers(
    policy: Any, prompts: Sequence[Sequence[dict[str, Any]]], max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy answers of an `HFPolicy` to `prompts`, `batch_size` prompts per generate call."""
    from veason_ray.models.hf_policy import GenerationSettings

    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0)
    answers: list[str] = []
    for start in range(0, len(prompts), max(1, batch_size)):
        answers += policy.generate(prompts[start : start + max(1, batch_size)], settings)
    return answers
