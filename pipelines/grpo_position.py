"""Where a GRPO run stands in its data, and the batches it draws from there.

DriverState   what a checkpoint keeps of the driver besides the learner (`driver_state.json`): the steps
              done, the weight version, the epoch's consumed and skipped sample keys, the next group id,
              the frame stream's counts and the pools' fault counts, so a resumed run continues every
              counter as an uninterrupted run would.
Batch         one step's prompt groups and where the stream stood once it had drawn them.
draw_batches  the batches after a state, in the data stream's seeded order (the same seed, the same batches).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from veason_ray.config import VeasonConfig
from veason_ray.records import PromptGroup

if TYPE_CHECKING:
    from pipelines.frame_stream import StreamStats

DRIVER_STATE = "driver_state.json"


@dataclass
class DriverState:
    """What the driver needs to continue a run as if it had never stopped, as of the last batch trained on: the
    steps done, the weight version the engines serve, the epoch, the sample keys of this epoch trained on and
    those skipped (bad data) before the last of them, the next group id (group ids seed the sampling of their
    responses), the frame stream's counts (`StreamStats.counts()`) and the pools' fault counts (`rollout/
    restarts`, `reward/timeouts`, ...: the run's totals). Saved as JSON in every checkpoint."""

    step: int = 0
    epoch: int = 0
    consumed: list[str] = field(default_factory=list)
    next_group_id: int = 0
    weight_version: int = 0
    skipped: list[str] = field(default_factory=list)
    stream: dict[str, Any] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: bytes | str) -> DriverState:
        """A checkpoint's state. One saved before a field existed gets the field's default, and its step as the
        weight version (one push per step)."""
        doc = json.loads(raw)
        doc.setdefault("weight_version", doc["step"])
        return cls(**doc)

    def consume(self, batch: Batch) -> None:
        """Record `batch` as trained on: the data position a checkpoint keeps."""
        if batch.epoch != self.epoch:
            self.epoch, self.consumed = batch.epoch, []
        self.consumed += [g.sample.key for g in batch.groups]
        self.skipped, self.stream = list(batch.skipped), dict(batch.stream)
        self.next_group_id = max(g.group_id for g in batch.groups) + 1


@dataclass
class Batch:
    """One step's prompt groups, the epoch of the data stream they came from, and where the stream stood once it
    had drawn them: the epoch's skipped sample keys so far and its counts (`StreamStats.counts()`)."""

    epoch: int
    groups: list[PromptGroup]
    skipped: list[str] = field(default_factory=list)
    stream: dict[str, Any] = field(default_factory=dict)


def draw_batches(cfg: VeasonConfig, state: DriverState, stats: StreamStats) -> Iterator[Batch]:
    """Batches of `state`'s epoch without what it consumed or skipped, then of the next epochs, group ids from
    `state.next_group_id`; `stats` counts what the stream delivers. The stream is in a deterministic order, so a
    run resumed from the state after batch k draws batch k+1 and on as an uninterrupted run does. The frame
    stream (and its dataset readers) is imported here: the driver's `step` runs on batches from anywhere."""
    from pipelines.frame_stream import iter_prompt_groups

    epoch, next_id = state.epoch, state.next_group_id
    consumed, skipped = list(state.consumed), list(state.skipped)
    while True:
        exclude = frozenset(consumed + skipped)
        first_skip = len(stats.skipped_keys)  # the keys this stream skips follow
        produced = False
        for groups in iter_prompt_groups(
            cfg, epoch=epoch, first_group_id=next_id, put_frames=True, stats=stats, exclude=exclude
        ):
            produced = True
            next_id = groups[-1].group_id + 1
            yield Batch(epoch, groups, skipped + stats.skipped_keys[first_skip:], stats.counts())
        if not produced and not exclude:
            raise RuntimeError(f"data: no usable training sample in {cfg.data.root} ({cfg.data.train_split})")
        epoch, consumed, skipped = epoch + 1, [], []
