"""The GRPO driver's data position on a real local Ray, without models: the same seed gives the same batches
(sample keys and the group ids that seed sampling) whichever decoding actor finishes first, and a stream resumed
from a checkpoint's DriverState draws what the uninterrupted stream drew next, with its counts carried on and
a skipped (corrupt) expression neither decoded nor counted twice. A state saved before these fields still loads.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from itertools import islice
from pathlib import Path

import pytest
import ray

from pipelines.frame_stream import FrameStream, StreamStats, iter_prompt_groups, sampling_spec
from pipelines.grpo_position import Batch, DriverState, draw_batches
from veason_ray.config import VeasonConfig
from veason_ray.datasets import open_dataset
from veason_ray.sample_building import build_sample, sample_key


@pytest.fixture(scope="module", autouse=True)
def quiet_ray(local_ray):
    ray.data.DataContext.get_current().enable_progress_bars = False


def _config(root: Path) -> VeasonConfig:
    cfg = VeasonConfig()
    cfg.run.seed = 3
    cfg.data.root = str(root)
    cfg.data.max_expressions = 7
    cfg.data.num_frames = 2
    cfg.data.frame_size = 112
    cfg.data.decode_concurrency = 2  # two actors, one expression a block: they finish in any order
    cfg.data.decode_batch_size = 1
    cfg.data.progress_every_s = 0
    cfg.trainer.prompts_per_step = 2
    return cfg


def _take(batches, count: int) -> list:
    """The first `count` items, the stream closed after them (its decoding actors go back at once)."""
    try:
        return list(islice(batches, count))
    finally:
        batches.close()


def _keys_and_ids(batches: list[list]) -> list[list[tuple[str, int]]]:
    return [[(g.sample.key, g.group_id) for g in groups] for groups in batches]


def test_the_same_seed_gives_the_same_batches_and_group_ids(synthetic_revos):
    cfg = _config(synthetic_revos)
    records = [sample_key(r) for r in FrameStream(cfg).records]
    assert FrameStream(cfg).dataset().context.execution_options.preserve_order
    first, second = (_keys_and_ids(_take(iter_prompt_groups(cfg, first_group_id=10), 3)) for _ in range(2))
    assert first == second
    assert [key for groups in first for key, _ in groups] == records[:6]  # the seeded record order
    assert [group_id for groups in first for _, group_id in groups] == list(range(10, 16))


def _view(batch: Batch) -> tuple:
    return batch.epoch, [(g.sample.key, g.group_id) for g in batch.groups], batch.skipped, batch.stream


@pytest.mark.slow  # ~15 s: five stream passes, each starting its decoding actor (make test-slow)
def test_a_stream_resumed_from_a_driver_state_draws_what_the_uninterrupted_stream_drew(
    synthetic_revos, tmp_path
):
    root = tmp_path / "revos"
    shutil.copytree(synthetic_revos, root)
    cfg = _config(root)
    cfg.data.decode_concurrency = 1  # the order is the test above's; one actor starts sooner
    # the second expression's keyframe is a truncated JPEG: it (and any other drawing that frame) is skipped
    dataset = open_dataset("revos", str(root), "train")
    record = FrameStream(cfg).records[1]
    keyframe = build_sample(dataset, record, sampling_spec(cfg, "train"), epoch=0).keyframe
    frame = Path(dataset.video(record.video).frame_uris[keyframe])
    frame.write_bytes(frame.read_bytes()[:700])

    batches = _take(draw_batches(cfg, DriverState(), StreamStats()), 6)
    state, saved = DriverState(), []  # saved[k - 1]: what checkpoint k holds
    for batch in batches:
        state.consume(batch)
        saved.append(json.dumps(asdict(state)))
    uninterrupted = [_view(b) for b in batches]
    epochs = [b.epoch for b in batches]
    assert epochs == sorted(epochs) and epochs[0] == 0 and epochs[-1] == 1
    assert sample_key(record) in batches[0].skipped and batches[0].stream["skipped"]
    assert [g.group_id for b in batches for g in b.groups] == list(range(sum(len(b.groups) for b in batches)))

    end = epochs.count(0)
    assert end > 2
    for k, until in ((2, end), (end, len(batches))):  # mid-epoch to its end; from the end into epoch 1
        state = DriverState.from_json(saved[k - 1])
        resumed = _take(draw_batches(cfg, state, StreamStats.resumed(state.stream)), until - k)
        assert [_view(b) for b in resumed] == uninterrupted[k:until]


def test_a_driver_state_saved_before_the_resume_counters_loads_with_defaults():
    old = {"step": 6, "epoch": 1, "consumed": ["v/0"], "next_group_id": 14}
    state = DriverState.from_json(json.dumps(old))
    assert (state.step, state.epoch, state.consumed, state.next_group_id) == (6, 1, ["v/0"], 14)
    assert (state.weight_version, state.skipped, state.stream) == (6, [], {})  # one push per step
    stats = StreamStats.resumed(state.stream)
    assert (stats.samples, stats.frames, sum(stats.skipped.values())) == (0, 0, 0)
    carried = StreamStats.resumed({"samples": 12, "frames": 24, "skipped": {"corrupt_frame": 1}})
    metrics = carried.as_metrics()
    assert (metrics["data/samples"], metrics["data/frames"], metrics["data/skipped/corrupt_frame"]) == (
        12,
        24,
        1,
    )
    assert metrics["data/samples_per_s"] == 0  # the rates are this process's
