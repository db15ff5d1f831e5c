"""SAM2RewardPool: the verifiable rewards of GRPO groups, on Ray actors that each hold one frozen SAM2 on a
fraction of a GPU (or, with `reward.propagator: colour`, the synthetic world's colour tracker and no model). The
GRPO driver submits each group as soon as its rollouts are generated and collects scored groups in completion
order, so reward overlaps generation.

Each `SAM2RewardWorker` batches the groups that reach it while it is busy: one shared pass per batch
(`veason_ray.models.group_scoring.score_groups`: every frame encoded once, identical objects tracked once,
objects of all groups batched through SAM2) gives every rollout exactly `reward_scoring.score_response`.

Faults (the calls run through `actors/supervisor.py`): an actor that dies is restarted by Ray
(`max_restarts`), one that hangs past `timeout_s` is killed and restarted, one that cannot restart or does not
come up within the start timeout is replaced; its groups are retried on whichever actor is up, and so is a group
whose worker raised. After `max_retries` retries a group is scored without the propagator (consistency 0, the
reason in `consistency_error` and `Scored.notes["reward_failure"]`, logged). Every submitted group comes back;
nothing blocks for ever.

Talks to: the driver that owns it (pipelines/), its actors through an ActorSupervisor, and the object store for
frames passed by reference.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import ray

from actors.request_batching import RequestBatcher
from actors.supervisor import ActorFailure, ActorSupervisor, Call
from veason_ray.config import RewardConfig, StorageConfig
from veason_ray.records import PromptGroup, Rollout, Scored
from veason_ray.reward_rules import reward_rules
from veason_ray.reward_scoring import score_sample
from veason_ray.rewards import needs_masks

log = logging.getLogger(__name__)

_ACTOR_THREADS = 64  # concurrent score() calls one actor accepts (each waits for its batch)


class SAM2RewardWorker:
    """The body of one reward actor: the mask propagator of `reward.propagator` (a SAM2 group propagator by
    default; the colour tracker on the synthetic world; none at all when no scored term needs masks, e.g.
    `reward.weights.consistency=0`) and a thread that scores queued groups in batches of up to
    `max_groups_per_batch`. The pool runs it as a threaded Ray actor."""

    def __init__(
        self, reward_cfg: RewardConfig, storage: StorageConfig | None = None, cache_dir: str | None = None
    ):
        import torch

        from veason_ray.models.propagator_choice import build_mask_propagator

        self.cfg = reward_cfg
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.rules = reward_rules(reward_cfg.rules)
        self.propagator = (
            build_mask_propagator(
                reward_cfg, device=self.device, storage=storage, cache_dir=cache_dir, batched=True
            )
            if needs_masks(reward_cfg.weights)
            else None
        )
        self._batcher = RequestBatcher(
            self._score_batch, reward_cfg.max_groups_per_batch, reward_cfg.batch_wait_s, "reward-scoring"
        )

    def ready(self) -> str:
        """This incarnation of the actor: process id and device (answers once the model is loaded)."""
        return f"{os.getpid()}:{self.device}"

    def score(self, group: PromptGroup, rollouts: Sequence[Rollout]) -> list[Scored]:
        """The rewards of one group's rollouts, in order. Blocks until the batch holding it is scored."""
        from veason_ray.models.group_scoring import GroupInput

        frames = group.sample.resolve_frames(ray.get)
        return self._batcher.submit(GroupInput(group, list(rollouts), frames))

    def _score_batch(self, items: list[Any]) -> list[list[Scored]]:
        from veason_ray.models.group_scoring import score_groups

        return score_groups(items, self.propagator, self.cfg.weights, self.rules)


class SAM2RewardPool:
    """`reward_cfg.actors` SAM2 reward actors, each on `gpus_per_actor` GPUs (fractional) and
    `cpus_per_actor` CPUs. `submit` a group, then `wait` / `results` for scored groups in completion order,
    or `score` a whole batch. Not thread-safe: one driver thread uses it.

    worker: the actor body (tests inject faulty subclasses of `SAM2RewardWorker`)."""

    def __init__(
        self,
        reward_cfg: RewardConfig,
        storage: StorageConfig | None = None,
        *,
        cache_dir: str | None = None,
        worker: type = SAM2RewardWorker,
        start_timeout_s: float | None = None,
        scheduling: Sequence[Any] | None = None,
    ):
        if reward_cfg.actors < 1:
            raise ValueError(f"reward.actors must be >= 1, got {reward_cfg.actors}")
        self.cfg = reward_cfg
        self._args = (reward_cfg, storage, cache_dir)
        self._remote = ray.remote(worker)
        self._tickets = itertools.count()
        # Per actor, Ray scheduling options (a placement-group bundle); a replacement goes where it was.
        self._scheduling = list(scheduling or [{}] * reward_cfg.actors)
        # The actors, their calls and restarts; its `restarts` and `timeouts` are the pool's fault counts.
        self.supervisor = ActorSupervisor(
            self._start_actor,
            reward_cfg.actors,
            name="reward actor",
            ready_timeout_s=start_timeout_s or reward_cfg.timeout_s,
        )

    # -- public API -------------------------------------------------------------------------------------

    @property
    def actors(self) -> list[Any]:
        """The current actor handles (for inspection and fault-injection tests)."""
        return self.supervisor.handles

    @property
    def pending(self) -> int:
        """Groups submitted and not yet returned by `wait` / `results`."""
        return self.supervisor.pending

    def submit(self, group: PromptGroup, rollouts: Sequence[Rollout]) -> int:
        """Queue one group for scoring; returns its ticket. Frames may be an array or an ObjectRef."""
        ticket = next(self._tickets)
        self.supervisor.submit(
            "score",
            group,
            list(rollouts),
            timeout_s=self.cfg.timeout_s,
            key=ticket,
            retries=self.cfg.max_retries,
        )
        return ticket

    def wait(self, timeout_s: float | None = None) -> list[list[Scored]]:
        """Scored groups finished since the last call, in completion order; blocks until at least one is
        finished (or `timeout_s` passes; then possibly []). [] at once when nothing is pending."""
        return [scored for _, scored in self._collect(timeout_s)]

    def _collect(self, timeout_s: float | None) -> list[tuple[int, list[Scored]]]:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        done: list[tuple[int, list[Scored]]] = []
        while not done and self.pending:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            for call in self.supervisor.wait(remaining):
                scored = self._scored(call)
                if scored is not None:
                    done.append((call.key, scored))
        return done

    def results(self) -> Iterator[list[Scored]]:
        """Every pending scored group, one at a time, in completion order."""
        while self.pending:
            yield from self.wait()

    def score(
        self, groups: Sequence[PromptGroup], rollouts: Sequence[Sequence[Rollout]]
    ) -> list[list[Scored]]:
        """Blocking: the scored rollouts of each group, in the order of `groups`. Call with nothing pending."""
        if self.pending:
            raise RuntimeError("score() needs an idle pool; collect pending groups with wait() first")
        tickets = [self.submit(group, rows) for group, rows in zip(groups, rollouts, strict=True)]
        order = {ticket: index for index, ticket in enumerate(tickets)}
        out: list[list[Scored]] = [[] for _ in tickets]
        while self.pending:
            for ticket, scored in self._collect(None):
                out[order[ticket]] = scored
        return out

    def shutdown(self) -> None:
        self.supervisor.shutdown()

    # -- scheduling -------------------------------------------------------------------------------------

    def _start_actor(self, index: int) -> Any:
        return self._remote.options(
            num_gpus=self.cfg.gpus_per_actor,
            num_cpus=self.cfg.cpus_per_actor,
            max_restarts=self.cfg.max_restarts,
            max_task_retries=0,  # retries are the pool's: counted, bounded, and free to move to another actor
            max_concurrency=_ACTOR_THREADS,
            **self._scheduling[index],
        ).remote(*self._args)

    def _scored(self, call: Call) -> list[Scored] | None:
        """A returned call's scored group; None when it runs again (its worker raised, retries are left)."""
        if call.error is None:
            for item in call.result:
                item.notes.update(reward_ticket=call.key, reward_attempts=len(call.errors) + 1)
            return call.result
        if not isinstance(call.error, ActorFailure):  # the worker raised; the actor itself is fine
            reason = f"reward worker raised {type(call.error).__name__}: {str(call.error)[:300]}"
            if self.supervisor.retry(call, reason):
                return None
        message = f"reward pool gave up after {len(call.errors)} attempts: {'; '.join(call.errors)}"
        group = call.args[0]
        log.error("reward group %d (%s): %s", group.group_id, group.sample.key, message)
        return self._without_sam2(call, message)

    def _without_sam2(self, call: Call, message: str) -> list[Scored]:
        group, rollouts = call.args
        sample = group.sample
        out = []
        for rollout in rollouts:
            reward = score_sample(
                rollout.text, sample, weights=self.cfg.weights, rules=reward_rules(self.cfg.rules)
            )
            if reward.consistency_error is not None:  # the propagator was needed: say why it is missing
                reward = dataclasses.replace(reward, consistency_error=message)
            notes = {
                "reward_ticket": call.key,
                "reward_attempts": len(call.errors),
                "reward_failure": message,
            }
            out.append(Scored(rollout, reward, notes))
        return out
