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
(`trainer.resume`) as an uninterrupted run would have: the expressions it already trained on (or skipped) this
epoch left out, its step, weight version, group ids and data counts carried on (`DriverState`); the data
stream's order is seeded, so the same seed gives the same batches. At the end: reward curves as PNG and the
policy as a Hugging Face folder in `<run.output_dir>/policy_hf`. With an s3:// `run.output_dir` everything lands
there: checkpoints and the policy directly, the logs (metrics, curves, samples) from a local staging folder at
every checkpoint and at the end (`veason_ray/output_mirror.py`), so a job whose head is lost resumes, on any
node, with its metrics continuing.

One step off-policy (`trainer.max_staleness=1`, disaggregated placement, `learner.old_logprobs=engine`): the
rollouts of step k+1 are generated and scored, on a background thread, while the learner trains on step k.
The weight push after step k waits for that generation to finish (an engine never changes weights in the
middle of a batch), so step k+1 trains on rollouts exactly one version old (`weights/staleness_max`, checked
against the bound every step), and the generation of step k+2 starts right after the push. A batch counts as
consumed once trained on, so a checkpoint taken while the next batch is generated does not hold that batch:
a resumed run draws it again (and its first step is on-policy). An engine restarted during the overlap is
re-synced after the learner's running update (its ranks serve one call at a time); over NCCL it then holds
the new weights under the old version number, so its rollouts are less stale than recorded, never more.
Deeper pipelines are refused: the learner needs the batch in flight next, so a second one would add
staleness without adding overlap.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from pipelines import preflight
from pipelines.config_command import add_config_arguments, config_from_args
from pipelines.console import console_stream, open_console, say
from pipelines.grpo_position import DRIVER_STATE, Batch, DriverState, draw_batches
from pipelines.placement import build_placement
from pipelines.ray_runtime import init_ray
from pipelines.run_log import METRICS_FILE, WANDB_ID_FILE, RunLog, save_samples, summary_line
from veason_ray.config import VeasonConfig
from veason_ray.config_loading import ConfigError, save_config
from veason_ray.object_store import is_s3_uri, join_uri, store_for
from veason_ray.output_mirror import OutputMirror
from veason_ray.records import Scored
from veason_ray.training.checkpoint import checkpoint_tag, latest_complete, prune_checkpoints
from veason_ray.training.rollout_batch import train_items

if TYPE_CHECKING:
    from actors.weight_sync import SyncReport
    from pipelines.frame_stream import StreamStats

log = logging.getLogger(__name__)
FAULT_COUNTS = ("restarts", "timeouts")  # of each pool's supervisor, per run (carried across resumes)


@dataclass
class ScoredBatch:
    """A batch's rollouts scored by the reward pool (group id -> its scored responses), when their generation
    started (time.perf_counter), how long generation and the reward wait after it took, and whether it ran
    ahead, during the previous step's update."""

    batch: Batch
    scored: dict[int, list[Scored]]
    started: float
    generate_s: float
    reward_wait_s: float
    ahead: bool = False


def check_trainer_config(cfg: VeasonConfig) -> None:
    """Refuse settings the driver cannot run as asked, naming the fields and the fix (before any actor starts)."""
    if cfg.trainer.max_staleness == 0:  # its bounds ([0, 1]) are the config's
        return
    if cfg.placement.mode != "disaggregated":
        raise ConfigError(
            f"trainer.max_staleness=1 needs placement.mode=disaggregated (got {cfg.placement.mode!r}): colocated "
            "engines sleep while the learner trains on their GPUs, so nothing can generate during the update; "
            "set placement.mode=disaggregated or trainer.max_staleness=0"
        )
    if cfg.learner.old_logprobs != "engine":
        raise ConfigError(
            f"trainer.max_staleness=1 needs learner.old_logprobs=engine (got {cfg.learner.old_logprobs!r}): "
            "rollouts one version old must be weighed against the policy that sampled them, not recomputed "
            "with the learner's newer weights; set learner.old_logprobs=engine or trainer.max_staleness=0"
        )


def run_outputs(cfg: VeasonConfig) -> OutputMirror:
    """Where logs, curves and images go: run.output_dir itself, or (s3://) a local staging folder pushed there at
    every checkpoint and at the end, with what a resumed run continues (its metrics, its wandb run) pulled back."""
    outputs = OutputMirror(cfg.run.output_dir, cfg.storage, exclude=("wandb",))
    outputs.pull(METRICS_FILE, WANDB_ID_FILE)
    return outputs


class GRPODriver:
    """Builds the placement and the three pools, resumes, and runs the steps."""

    def __init__(self, cfg: VeasonConfig, outputs: OutputMirror) -> None:
        from actors.learner import LearnerGroup
        from actors.reward import SAM2RewardPool
        from actors.rollout_pool import RolloutPool
        from veason_ray.models.loading import portable_model_spec

        check_trainer_config(cfg)
        self.cfg = cfg
        self.outputs = outputs
        self.out = outputs.local
        self.checkpoints = checkpoint_root(cfg)
        init_ray(cfg.placement)
        cache = cfg.model.cache_dir or None
        # Each actor resolves the checkpoints on its own node (an s3:// copy fetched once per node, into
        # model.cache_dir): a path resolved here would not exist on the other nodes of a cluster.
        policy = portable_model_spec(cfg.model.policy)
        reference = portable_model_spec(cfg.model.reference) if cfg.model.reference else policy
        start = time.perf_counter()
        self.placement = build_placement(cfg)
        log.info("placement: %s", self.placement.description)
        # The pools start side by side, except where a GPU is shared: vLLM sizes its KV cache from the device's
        # free memory between its start and its profiling pass, so on a colocated GPU the learner reads its
        # models into CPU memory meanwhile and takes the GPU once the engines are up (with the reward pool).
        colocated = cfg.placement.mode == "colocated"
        self.learner = LearnerGroup(
            cfg, policy, reference, scheduling=self.placement.learner, defer_device=True
        )
        if not colocated:
            self.learner.start_device_setup()
        self.rollout = RolloutPool(
            policy,
            cfg.rollout,
            dtype=cfg.model.dtype,
            seed=cfg.run.seed,
            scheduling=self.placement.rollout,
            colocated=colocated,
            storage=cfg.storage,
            cache_dir=cache,
        )
        engines_up = time.perf_counter() - start
        self.learner.start_device_setup()
        self.reward = SAM2RewardPool(
            cfg.reward, cfg.storage, cache_dir=cache, scheduling=self.placement.reward
        )
        self.learner.wait_ready()
        self.startup_seconds = time.perf_counter() - start
        self.startup_split = {
            "learner_load_s": self.learner.load_seconds,  # CPU, beside the engines' start
            "engines_up_s": engines_up,
            "learner_device_s": max(i["seconds"] for i in self.learner.setup_info),
            # of it, the slowest rank's: the process group; the DeepSpeed engine (the policy to the GPU, the
            # optimizer's states); the reference to the GPU
            **{
                f"learner_{k}": max(i[k] for i in self.learner.setup_info)
                for k in ("process_group_s", "engine_s", "reference_s")
            },
            "learner_ready_s": self.learner.setup_seconds,  # since its actors were created
        }
        log.info(
            "started in %.0f s: engines up at %.0f s; learner loaded in %.0f s, on its device in %.0f s",
            self.startup_seconds,
            engines_up,
            self.startup_split["learner_load_s"],
            self.startup_split["learner_device_s"],
        )
        self.gpus = sum(b.get("GPU", 0) for g in self.placement.groups for b in g.bundle_specs)
        # One thread generates the next batch while the learner trains; it alone uses the rollout and reward
        # pools until the step waits for it (neither pool is thread-safe).
        self.background = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-ahead")
            if cfg.trainer.max_staleness > 0
            else None
        )
        self.state = DriverState()
        self.faults_before: dict[str, int] = {}  # the pools' fault counts of the run before its last resume
        self.saved_step = 0  # the step of the latest complete checkpoint (0: none, the starting policy)
        self.stats: StreamStats | None = None  # the frame stream's counts, once `batches` runs
        self.resumed_from = self._resume()

    # ---- checkpoints ----

    def _resume(self) -> str | None:
        latest = self.learner.latest_checkpoint(self.checkpoints) if self.cfg.trainer.resume else None
        if latest is None:
            return None
        step = self.learner.load(latest)
        self.state = DriverState.from_json(
            store_for(latest, self.cfg.storage).read_bytes(join_uri(latest, DRIVER_STATE))
        )
        self.saved_step = step
        self.faults_before = dict(self.state.faults)
        if self.state.step != step:
            raise RuntimeError(
                f"{latest}: learner state is at step {step}, driver state at {self.state.step}"
            )
        # the engines start from the initial checkpoint: they get the learner's weights under the version the
        # uninterrupted run had given them
        self.rollout.sync_weights(self.learner, version=self.state.weight_version)
        log.info("resumed from %s (step %d, epoch %d)", latest, step, self.state.epoch)
        return latest

    def save(self) -> str:
        """Checkpoint the learner and this driver's state. A save that fails (a full disk, an object store
        down past `storage.outage_timeout_s`) removes what it wrote and stops the run with the reason; the
        latest complete checkpoint stays the one a resume starts from."""
        state = json.dumps(asdict(self.state)).encode()
        try:
            uri = self.learner.save(self.checkpoints, self.state.step, parts={DRIVER_STATE: state})
        except Exception as error:
            partial = join_uri(self.checkpoints, checkpoint_tag(self.state.step))
            with contextlib.suppress(Exception):
                store_for(partial, self.cfg.storage).delete_tree(partial)
            cause = str(getattr(error, "cause", None) or error).strip().splitlines()
            free = -1 if is_s3_uri(partial) else free_mib(self.checkpoints)
            disk = (
                "" if free < 0 else f"; {free} MiB free there" + (": the disk is full" if free < 64 else "")
            )
            raise RuntimeError(
                f"checkpoint of step {self.state.step} could not be written to {partial} "
                f"({cause[-1] if cause else type(error).__name__}); what it wrote was removed{disk}"
            ) from error
        self.saved_step = self.state.step
        for removed in prune_checkpoints(
            self.checkpoints, self.cfg.trainer.keep_checkpoints, self.cfg.storage
        ):
            log.info(
                "removed checkpoint %s (trainer.keep_checkpoints=%d)",
                removed,
                self.cfg.trainer.keep_checkpoints,
            )
        self.outputs.push()  # the logs of the steps this checkpoint holds
        return uri

    # ---- data ----

    def batches(self) -> Iterator[Batch]:
        """`draw_batches` from the driver's state, the stream's counts carried on from it. The state moves only
        when a batch is trained on (`DriverState.consume`), so a batch drawn ahead is not yet consumed."""
        from pipelines.frame_stream import StreamStats

        self.stats = self.stats or StreamStats.resumed(self.state.stream, self.cfg.data.progress_every_s)
        return draw_batches(self.cfg, self.state, self.stats)

    # ---- one step ----

    def generate(self, batch: Batch, ahead: bool = False) -> ScoredBatch:
        """n responses per group on the rollout pool on its current weights, each engine's chunk scored on the
        reward pool as soon as it is generated."""
        groups = batch.groups
        start = time.perf_counter()
        for first, chunk in self.rollout.generate_stream(groups):
            for offset, rollouts in enumerate(chunk):
                self.reward.submit(groups[first + offset], rollouts)
        generated = time.perf_counter()
        scored = {rows[0].rollout.group_id: rows for rows in self.reward.results() if rows}
        return ScoredBatch(batch, scored, start, generated - start, time.perf_counter() - generated, ahead)

    def generate_ahead(self, batch: Batch) -> Future:
        """`generate(batch)` on the background thread (trainer.max_staleness > 0): a Future of its ScoredBatch."""
        if self.background is None:
            raise RuntimeError("generation ahead needs trainer.max_staleness > 0")
        return self.background.submit(self.generate, batch, True)

    def step(self, batch: Batch) -> dict[str, float]:
        """One on-policy step on `batch`: generate and score, update, push; the step's metrics."""
        metrics, _ = self.train(self.generate(batch))
        return metrics

    def train(
        self, rollouts: ScoredBatch, ahead: Future | None = None
    ) -> tuple[dict[str, float], ScoredBatch | None]:
        """Advantages, the learner's update and the weight push for `rollouts`. `ahead` (a `generate_ahead`
        Future) runs during the update; the push waits for it, so no engine changes weights mid-generation.
        Returns the step's metrics and `ahead`'s ScoredBatch (None without `ahead`)."""
        entered = time.perf_counter()
        version = self.rollout.version  # the learner holds the weights of the latest push
        items, metrics = train_items(rollouts.batch.groups, rollouts.scored)
        staleness = [version - s.rollout.weight_version for rows in rollouts.scored.values() for s in rows]
        if max(staleness) > self.cfg.trainer.max_staleness:
            raise RuntimeError(
                f"rollouts of weight version {version - max(staleness)} trained at version {version}: staleness "
                f"{max(staleness)} exceeds trainer.max_staleness={self.cfg.trainer.max_staleness}"
            )
        marks = [time.perf_counter()]
        if self.cfg.placement.mode == "colocated":
            self.rollout.sleep()
        marks.append(time.perf_counter())
        try:
            learned = self.learner.update(items)
        except BaseException:
            if ahead is not None:
                wait([ahead])  # the pools are not shared with a running generation past this point
            raise
        marks.append(time.perf_counter())
        following = ahead.result() if ahead is not None else None
        marks.append(time.perf_counter())
        sync = self.rollout.sync_weights(self.learner)
        marks.append(time.perf_counter())
        self.state.consume(rollouts.batch)
        self.state.step += 1
        self.state.weight_version = sync.version
        self.state.faults = self.fault_counts()
        metrics.update({f"learner/{k}": v for k, v in learned.items()})
        metrics.update(self._seconds(rollouts, entered if rollouts.ahead else rollouts.started, marks, sync))
        metrics.update(
            {
                "weights/version": float(sync.version),
                "weights/sync_bytes": float(sync.nbytes),
                "weights/staleness_max": float(max(staleness)),
                "weights/staleness_mean": sum(staleness) / len(staleness),
                "rollout/generated_ahead": float(rollouts.ahead),
                "data/epoch": float(self.state.epoch),
                **{key: float(n) for key, n in self.state.faults.items()},
                **(self.stats.as_metrics() if self.stats is not None else {}),
            }
        )
        tokens = metrics["response/prompt_tokens"] + metrics["response/tokens"]
        metrics["throughput/tokens_per_s"] = tokens / metrics["time/step_s"]
        metrics["throughput/tokens_per_s_per_gpu"] = tokens / metrics["time/step_s"] / max(self.gpus, 1)
        return metrics, following

    def fault_counts(self) -> dict[str, int]:
        """The pools' restarts and timeouts in this run so far: those before the resume and this process's."""
        return {
            f"{name}/{count}": self.faults_before.get(f"{name}/{count}", 0) + getattr(pool.supervisor, count)
            for name, pool in (("rollout", self.rollout), ("reward", self.reward))
            for count in FAULT_COUNTS
        }

    @staticmethod
    def _seconds(
        rollouts: ScoredBatch, start: float, marks: list[float], sync: SyncReport
    ) -> dict[str, float]:
        """The step's seconds. It runs from `start` (its generation's start, or the `train` call when it was
        generated ahead) to the end of the push (`marks`: before sleep, after sleep, after the update, after
        the wait for the batch ahead, after the push). The parts on its critical path: generate and reward
        wait (unless generated ahead), sleep, update, the wait for the batch ahead, push and wake (colocated:
        `sync_weights` wakes around the push); `time/other_s` is the rest."""
        before_sleep, slept, updated, waited, done = marks
        critical = {
            "time/sleep_s": slept - before_sleep,
            "time/update_s": updated - slept,
            "time/wait_ahead_s": waited - updated,
            "time/sync_s": sync.seconds,
            "time/wake_s": max(done - waited - sync.seconds, 0.0),
        }
        on_path = 0.0 if rollouts.ahead else rollouts.generate_s + rollouts.reward_wait_s
        step_s = done - start
        return {
            "time/step_s": step_s,
            "time/generate_s": rollouts.generate_s,
            "time/reward_wait_s": rollouts.reward_wait_s,
            **critical,
            "time/other_s": max(step_s - on_path - sum(critical.values()), 0.0),
        }

    # ---- the run ----

    def fit(self) -> dict[str, Any]:
        from tqdm import tqdm

        cfg, total = self.cfg, self.cfg.trainer.steps
        run_log = RunLog(cfg, self.out, resumed_at=self.state.step)
        stream = console_stream()  # the bar and the step lines written above it
        bar = tqdm(
            total=total, initial=self.state.step, desc="grpo", unit="step", dynamic_ncols=True, file=stream
        )
        last: dict[str, float] = {}
        batches = self.batches()
        ready: ScoredBatch | None = None  # the next step's rollouts, when they were generated ahead
        ahead: Future | None = None
        try:
            while self.state.step < total:
                current = ready or self.generate(next(batches))
                if ahead is None and self.background is not None and self.state.step + 1 < total:
                    ahead = self.generate_ahead(next(batches))
                last, ready = self.train(current, ahead)
                ahead = None
                if ready is not None and self.state.step + 1 < total:
                    ahead = self.generate_ahead(next(batches))  # overlaps this step's logging and checkpoint
                step = self.state.step
                run_log.log(step, last)
                bar.update(1)
                if step % max(cfg.trainer.log_every, 1) == 0:
                    bar.write(summary_line(step, total, last), file=stream)
                every = cfg.trainer.sample_images_every
                if every and (step % every == 0 or step == 1):
                    save_samples(step, current.batch.groups, current.scored, self.out, ray.get)
                if cfg.trainer.save_every and step % cfg.trainer.save_every == 0 and step < total:
                    self.save()
        finally:
            if ahead is not None:
                wait([ahead])
            bar.close()
            batches.close()  # stop Ray Data's stream now, not at interpreter exit after Ray is gone
        checkpoint = self.save() if self.state.step != self.saved_step else None
        policy = self.learner.export(join_uri(cfg.run.output_dir, "policy_hf"))
        curves = run_log.finish()
        curves = curves and self.outputs.uri_of(curves.relative_to(self.out).as_posix())
        return {
            "steps": self.state.step,
            "checkpoint": checkpoint,
            "policy": policy,
            "curves": curves,
            "last": last,
        }

    def shutdown(self) -> None:
        if self.background is not None:
            self.background.shutdown(wait=True)
        self.reward.shutdown()
        self.rollout.shutdown()
        self.learner.shutdown()
        self.placement.remove()


def train(cfg: VeasonConfig) -> dict[str, Any]:
    """Run GRPO as `cfg` says (resuming when a checkpoint exists); returns where the outputs are."""
    outputs = run_outputs(cfg)
    save_config(cfg, outputs.local / "config.yaml")
    try:
        driver = GRPODriver(cfg, outputs)
        try:
            result = driver.fit()
        except Exception:
            say(resume_hint(cfg, driver.state.step), err=True)
            raise
        finally:
            driver.shutdown()
    finally:
        outputs.push()
    result["metrics"] = outputs.uri_of(METRICS_FILE)
    result["resumed_from"] = driver.resumed_from
    result["startup_seconds"] = driver.startup_seconds
    return result


def checkpoint_root(cfg: VeasonConfig) -> str:
    """Where a run's checkpoints go (and a resume looks): `<run.output_dir>/checkpoints`."""
    return join_uri(cfg.run.output_dir, "checkpoints")


def free_mib(path: str) -> int:
    """MiB free on the disk of local `path`, or of its nearest existing parent."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free >> 20


def resume_hint(cfg: VeasonConfig, step: int) -> str:
    """What a user whose run stopped at `step` can do: the checkpoint the same command resumes from."""
    if not cfg.trainer.resume:
        return f"GRPO stopped after step {step}; trainer.resume=false: the same command starts over"
    try:
        latest = latest_complete(checkpoint_root(cfg), cfg.storage)
    except Exception as error:  # the store that failed the run may still be down
        return f"GRPO stopped after step {step}; its checkpoints could not be listed ({error})"
    if latest is None:
        return f"GRPO stopped after step {step}; no complete checkpoint yet: the same command starts over"
    return f"GRPO stopped after step {step}; the same command resumes from {latest}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = config_from_args(args, "grpo")
    open_console(cfg, "grpo")
    preflight.check("grpo", preflight.training_problems(cfg))
    result = train(cfg)
    say(
        f"GRPO finished at step {result['steps']}"
        + (f" (resumed from {result['resumed_from']})" if result["resumed_from"] else "")
    )
    say(f"  policy       {result['policy']}")
    say(f"  checkpoint   {result['checkpoint'] or '(latest already saved)'}")
    say(f"  curves       {result['curves']}")
    say(f"  metrics      {result['metrics']}")
    return 0
