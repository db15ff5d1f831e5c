"""From scored rollouts to the learner's batch: group advantages (docs/method.md section 5) and the step's reward
metrics. Pure: the GRPO driver (`pipelines/grpo.py`) calls it between the reward pool and the learner.

Accuracy, as reported per step: the share of responses whose spatial reward (Hungarian-matched box IoU) is at
least 0.5, i.e. that found the target(s) on their keyframe. Groups whose rewards are all equal get advantage 0
and are kept (their tokens still carry the KL and entropy terms) and counted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from veason_ray.grpo import group_advantages
from veason_ray.records import PromptGroup, Scored, TrainItem
from veason_ray.rewards import ordered_parts

ACCURACY_IOU = 0.5


def train_items(
    groups: Sequence[PromptGroup], scored: Mapping[int, Sequence[Scored]]
) -> tuple[list[TrainItem], dict[str, float]]:
    """The learner's items (group order, response order) and the batch's reward metrics. `scored` maps a
    group id to its scored responses; every group must have the same number of responses."""
    rows = [sorted(scored[g.group_id], key=lambda s: s.rollout.response_index) for g in groups]
    sizes = {len(r) for r in rows}
    if len(sizes) != 1:
        raise ValueError(f"every group needs the same number of scored responses, got sizes {sorted(sizes)}")
    rewards = torch.tensor([[s.reward.total for s in row] for row in rows], dtype=torch.float64)
    advantages = group_advantages(rewards)
    items = [
        TrainItem(group, s.rollout.token_ids, s.rollout.logprobs, float(advantages.advantages[i, j]))
        for i, (group, row) in enumerate(zip(groups, rows, strict=True))
        for j, s in enumerate(row)
    ]
    flat = [s for row in rows for s in row]
    lengths = np.array([len(s.rollout.token_ids) for s in flat], dtype=np.float64)
    parts = ordered_parts(part for s in flat for part in s.reward.parts)
    metrics = {
        f"reward/{part}": float(np.mean([s.reward.parts.get(part, 0.0) for s in flat])) for part in parts
    }
    metrics["reward/total"] = float(rewards.mean())
    metrics.update(
        {
            "reward/accuracy": float(
                np.mean([s.reward.parts.get("spatial", 0.0) >= ACCURACY_IOU for s in flat])
            ),
            "reward/parse_rate": float(np.mean([s.reward.parse_failure is None for s in flat])),
            "reward/std_in_group": float(rewards.std(dim=1, unbiased=True).mean())
            if rewards.shape[1] > 1
            else 0.0,
            "reward/consistency_unmeasured": float(
                np.mean([s.reward.consistency_error is not None for s in flat])
            ),
            "response/length_mean": float(lengths.mean()),
            "response/length_max": float(lengths.max()),
            "response/truncated": float(np.mean([s.rollout.finish_reason == "length" for s in flat])),
            "response/prompt_tokens": float(sum(s.rollout.prompt_token_count for s in flat)),
            "response/tokens": float(lengths.sum()),
            "grpo/zero_variance_groups": float(advantages.zero_variance_groups),
            "grpo/groups": float(advantages.groups),
            "grpo/weight_version_min": float(min(s.rollout.weight_version for s in flat)),
        }
    )
    return items, metrics
