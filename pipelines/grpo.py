"""`veason grpo CONFIG [key=value ...]`: the GRPO main job, on a laptop (local Ray, CPU, logical GPUs) or a GPU
cluster (`ray job submit -- veason grpo configs/qwen2.5vl-3b-cluster.yaml`).

Each step (design.md, "One GRPO step"):
  1. the next `trainer.prompts_per_step` PromptGroups from the Ray Data frame stream (frames by reference);
  2. n responses per group on the rollout pool; each engine's chunk goes to the SAM2 reward pool the moment
     it is done, so scoring overlaps the rest of generation;
  3. group advantages and the learner's batch (`veason_ray/training/rollout_batch.py`);
  4. colocated: the engines sleep; the learner recomputes log-probs (policy, reference) and takes one step;
  5. the learner streams its weights to the engines (they wake in `rollout.wake_order`); weight version += 1;
  6. metrics (one line, JSONL, wandb), every `trainer.save_every` steps an atomic checkpoint of the learner
     and of this driver's data position, every `trainer.sample_images_every` steps responses drawn as PNG.
A run finds the latest complete checkpoint under `<run.output_dir>/checkpoints` and continues from it
(`trainer.resume`), the expressions it already trained on this epoch left out. At the end: reward curves as
PNG and the policy as a Hugging Face folder in `<run.output_dir>/policy_hf`.

Generation of step k+1 during the update of step k (`trainer.max_staleness` > 0) is not implemented: the
config is refused with that message rather than silently run on-policy.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray

from pipelines.config_command import add_config_arguments, config_from_args
from pipelines.frame_stream import StreamStats, iter_prompt_groups
from pipelines.placement import build_placement
from pipelines.ray_runtime import init_ray
from pipelines.run_log import RunLog, save_samples, summary_line
from veason_ray.config import VeasonConfig
from veason_ray.config_loading import ConfigError, save_config
from veason_ray.object_store import is_s3_uri, join_uri, store_for
from veason_ray.records import PromptGroup, Scored
from veason_ray.training.rollout_batch import train_items

log = logging.getLogger(__name__)
DRIVER_STATE = "driver_state.json"


@dataclass
class DriverState:
    """What the driver needs to continue a run: the steps done, the epoch, the sample keys of this epoch
    already trained on, and the next group id (group ids seed the sampling of their responses)."""

    step: int = 0
    epoch: int = 0
    consumed: list[str] = field(default_factory=list)
    next_group_id: int = 0


def local_run_dir(cfg: VeasonConfig) -> Path:
    """Where logs, curves and images go: run.output_dir itself, or a local folder when it is on s3://."""
    if is_s3_uri(cfg.run.output_dir):
        return Path(tempfile.gettempdir()) / "veason_runs" / cfg.run.name
    return Path(cfg.run.output_dir)


class GRPODriver:
    """Builds the placement and the three pools, resumes, and runs the steps."""

    def __init__(self, cfg: VeasonConfig) -> None:
        from actors.learner import LearnerGroup
        from actors.reward import SAM2RewardPool
        from actors.rollout_pool import RolloutPool
        from veason_ray.models.loading import resolve_model_dir

        if cfg.trainer.max_staleness > 0:
            raise ConfigError(
                "trainer.max_staleness: generation ahead of the update is not implemented yet; set it to 0"
            )
        self.cfg = cfg
        self.out = local_run_dir(cfg)
        self.checkpoints = join_uri(cfg.run.output_dir, "checkpoints")
        init_ray(cfg.placement)
        cache = cfg.model.cache_dir or None
        policy = str(resolve_model_dir(cfg.model.policy, cfg.storage, cache))
        reference = (
            str(resolve_model_dir(cfg.model.reference, cfg.storage, cache)) if cfg.model.reference else policy
        )
        start = time.perf_counter()
        self.placement = build_placement(cfg)
        log.info("placement: %s", self.placement.description)
        self.learner = LearnerGroup(cfg, policy, reference, scheduling=self.placement.learner)
        self.rollout = RolloutPool(
            policy, cfg.rollout, dtype=cfg.model.dtype, seed=cfg.run.seed, scheduling=self.placement.rollout
        )
        self.reward = SAM2RewardPool(
            cfg.reward, cfg.storage, cache_dir=cache, scheduling=self.placement.reward
        )
        self.startup_seconds = time.perf_counter() - start
        self.gpus = sum(b.get("GPU", 0) for g in self.placement.groups for b in g.bundle_specs)
        self.state = DriverState()
        self.saved_step = 0  # the step of the latest complete checkpoint (0: none, the starting policy)
        self.stats = StreamStats(progress_every_s=cfg.data.progress_every_s)
        self.resumed_from = self._resume()

    # ---- checkpoints ----

    def _resume(self) -> str | None:
        latest = self.learner.latest_checkpoint(self.checkpoints) if self.cfg.trainer.resume else None
        if latest is None:
            return None
        step = self.learner.load(latest)
        raw = store_for(latest, self.cfg.storage).read_bytes(join_uri(latest, DRIVER_STATE))
        self.state = DriverState(**json.loads(raw))
        self.saved_step = step
        if self.state.step != step:
            raise RuntimeError(
                f"{latest}: learner state is at step {step}, driver state at {self.state.step}"
            )
        self.rollout.sync_weights(self.learner)  # the engines start from the initial checkpoint
        log.info("resumed from %s (step %d, epoch %d)", latest, step, self.state.epoch)
        return latest

    def save(self) -> str:
        state = json.dumps(asdict(self.state)).encode()
        uri = self.learner.save(self.checkpoints, self.state.step, parts={DRIVER_STATE: state})
        self.saved_step = self.state.step
        return uri

    # ---- data ----

    def batches(self):
        """PromptGroup lists of this epoch (minus what a resumed run consumed), then of the next epochs."""
        cfg = self.cfg
        while True:
            produced = False
            for groups in iter_prompt_groups(
                cfg,
                epoch=self.state.epoch,
                first_group_id=self.state.next_group_id,
                put_frames=True,
                stats=self.stats,
                exclude=frozenset(self.state.consumed),
            ):
                produced = True
                yield groups
            if not produced and not self.state.consumed:
                raise RuntimeError(
                    f"data: no usable training sample in {cfg.data.root} ({cfg.data.train_split})"
                )
            self.state.epoch += 1
            self.state.consumed = []

    # ---- one step ----

    def step(self, groups: list[PromptGroup]) -> tuple[dict[str, float], dict[int, list[Scored]]]:
        colocated = self.cfg.placement.mode == "colocated"
        start = time.perf_counter()
        for first, chunk in self.rollout.generate_stream(groups):
            for offset, rollouts in enumerate(chunk):
                self.reward.submit(groups[first + offset], rollouts)
        generated = time.perf_counter()
        scored = {rows[0].rollout.group_id: rows for rows in self.reward.results() if rows}
        rewarded = time.perf_counter()
        items, metrics = train_items(groups, scored)
        if colocated:
            self.rollout.sleep()
        learned = self.learner.update(items)
        updated = time.perf_counter()
        sync = self.rollout.sync_weights(self.learner)
        done = time.perf_counter()
        self.state.step += 1
        self.state.consumed += [g.sample.key for g in groups]
        self.state.next_group_id = max(g.group_id for g in groups) + 1
        tokens = metrics["response/prompt_tokens"] + metrics["response/tokens"]
        metrics.update({f"learner/{k}": v for k, v in learned.items()})
        metrics.update(
            {
                "time/step_s": done - start,
                "time/generate_s": generated - start,
                "time/reward_wait_s": rewarded - generated,
                "time/update_s": updated - rewarded,
                "time/sync_s": done - updated,
                "throughput/tokens_per_s": tokens / (done - start),
                "throughput/tokens_per_s_per_gpu": tokens / (done - start) / max(self.gpus, 1),
                "weights/version": float(sync.version),
                "weights/sync_bytes": float(sync.nbytes),
                "data/epoch": float(self.state.epoch),
                "rollout/restarts": float(self.rollout.restarts),
                **self.stats.as_metrics(),
            }
        )
        return metrics, scored

    # ---- the run ----

    def fit(self) -> dict[str, Any]:
        from tqdm import tqdm

        cfg, total = self.cfg, self.cfg.trainer.steps
        run_log = RunLog(cfg, self.out, resumed_at=self.state.step)
        bar = tqdm(total=total, initial=self.state.step, desc="grpo", unit="step", dynamic_ncols=True)
        last: dict[str, float] = {}
        batches = self.batches()
        try:
            while self.state.step < total:
                groups = next(batches)
                last, scored = self.step(groups)
                step = self.state.step
                run_log.log(step, last)
                bar.update(1)
                if step % max(cfg.trainer.log_every, 1) == 0:
                    bar.write(summary_line(step, total, last))
                every = cfg.trainer.sample_images_every
                if every and (step % every == 0 or step == 1):
                    save_samples(step, groups, scored, self.out, ray.get)
                if cfg.trainer.save_every and step % cfg.trainer.save_every == 0 and step < total:
                    self.save()
        finally:
            bar.close()
            batches.close()  # stop Ray Data's stream now, not at interpreter exit after Ray is gone
        checkpoint = self.save() if self.state.step != self.saved_step else None
        policy = self.learner.export(join_uri(cfg.run.output_dir, "policy_hf"))
        curves = run_log.finish()
        return {
            "steps": self.state.step,
            "checkpoint": checkpoint,
            "policy": policy,
            "curves": curves,
            "last": last,
        }

    def shutdown(self) -> None:
        self.reward.shutdown()
        self.rollout.shutdown()
        self.learner.shutdown()
        self.placement.remove()


def train(cfg: VeasonConfig) -> dict[str, Any]:
    """Run GRPO as `cfg` says (resuming when a checkpoint exists); returns where the outputs are."""
    save_config(cfg, local_run_dir(cfg) / "config.yaml")
    driver = GRPODriver(cfg)
    try:
        result = driver.fit()
    finally:
        driver.shutdown()
    result["resumed_from"] = driver.resumed_from
    result["startup_seconds"] = driver.startup_seconds
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = config_from_args(args, "grpo")
    result = train(cfg)
    print(
        f"GRPO finished at step {result['steps']}"
        + (f" (resumed from {result['resumed_from']})" if result["resumed_from"] else "")
    )
    print(f"  policy       {result['policy']}")
    print(f"  checkpoint   {result['checkpoint'] or '(latest already saved)'}")
    print(f"  curves       {result['curves']}")
    print(f"  metrics      {local_run_dir(cfg) / 'metrics.jsonl'}")
    return 0
