"""The Ray Data frame stream on a real local Ray: S3 (moto's HTTP server) gives exactly the local samples, bad
data (a corrupt JPEG, a truncated mp4) is skipped and counted, the Parquet cache replays every epoch exactly."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from test_video_decoding import truncate, write_mp4

from pipelines.frame_stream import FrameStream, StreamStats, iter_prompt_groups, sampling_spec
from veason_ray.config import VeasonConfig
from veason_ray.datasets import open_dataset
from veason_ray.object_store import join_uri, store_for
from veason_ray.sample_building import build_sample, sample_key
from veason_ray.video_decoding import video_uri


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def _config(root: str, **data) -> VeasonConfig:
    cfg = VeasonConfig()
    cfg.run.seed = 5
    cfg.data.root = root
    cfg.data.decode_concurrency = 2
    cfg.data.decode_batch_size = 3
    cfg.data.progress_every_s = 0
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def assert_same_sample(got, expected):
    assert got.key == expected.key
    assert got.frame_indices == expected.frame_indices and got.keyframe == expected.keyframe
    assert np.array_equal(got.frames, expected.frames)
    assert np.array_equal(got.gt_masks_560, expected.gt_masks_560)
    assert len(got.gt_boxes_560) == len(expected.gt_boxes_560)
    assert all(np.array_equal(a, b) for a, b in zip(got.gt_boxes_560, expected.gt_boxes_560, strict=True))
    assert (got.original_size, got.num_video_frames) == (expected.original_size, expected.num_video_frames)


def test_s3_stream_equals_local_read_and_skips_a_corrupt_jpeg(synthetic_revos, s3_server, s3_bucket):
    local = open_dataset("revos", str(synthetic_revos), "train")
    remote_root = join_uri(s3_bucket, "revos")
    store = store_for(remote_root, s3_server)
    store.upload_tree(synthetic_revos, remote_root)
    cfg = _config(remote_root)
    cfg.storage = s3_server
    spec = sampling_spec(cfg, "train")
    expected = {sample_key(r): build_sample(local, r, spec, epoch=1) for r in local.expressions()}
    first = next(iter(expected.values()))
    # uploaded truncated: a corrupt JPEG in the bucket
    bad_video, bad_index = first.record.video, first.keyframe
    bad_frame = Path(local.video(bad_video).frame_uris[bad_index])
    store.write_bytes(
        join_uri(remote_root, bad_frame.relative_to(synthetic_revos).as_posix()), bad_frame.read_bytes()[:700]
    )
    corrupt = {k for k, s in expected.items() if s.record.video == bad_video and bad_index in s.frame_indices}
    assert corrupt and len(corrupt) < len(expected)

    stats = StreamStats()
    groups = list(iter_prompt_groups(cfg, epoch=1, batch_size=4, stats=stats))
    assert [len(g) for g in groups[:-1]] == [4] * (len(groups) - 1)
    got = {g.sample.key: g.sample for batch in groups for g in batch}
    assert [g.group_id for batch in groups for g in batch] == list(range(len(got)))
    assert set(got) == set(expected) - corrupt
    for key, sample in got.items():
        assert_same_sample(sample, expected[key])
    metrics = stats.as_metrics()
    assert metrics["data/skipped/corrupt_frame"] == len(corrupt) and metrics["data/samples"] == len(got)


def _pass(cfg: VeasonConfig, epoch: int) -> tuple[FrameStream, dict]:
    stream = FrameStream(cfg, mode="train", epoch=epoch)
    return stream, {s.key: s for s in stream}


def test_cache_replays_every_epoch_exactly(synthetic_revos, s3_server, s3_bucket):
    local = open_dataset("revos", str(synthetic_revos), "train")
    cfg = _config(str(synthetic_revos), cache_uri=join_uri(s3_bucket, "cache"))
    cfg.storage = s3_server
    spec = sampling_spec(cfg, "train")
    building, built = _pass(cfg, epoch=2)  # decodes the candidate frames and writes the cache to S3
    assert building.cache_hit and building.cache_dir.startswith(s3_bucket)
    reading, replayed = _pass(cfg, epoch=3)  # reads the Parquet files: no decoding, a different epoch's draw
    assert reading.cache_hit
    for epoch, got in ((2, built), (3, replayed)):
        assert set(got) == {sample_key(r) for r in local.expressions()}
        for record in local.expressions():
            assert_same_sample(got[sample_key(record)], build_sample(local, record, spec, epoch))
    # the cache holds plain Arrow values and JSON: reading a cache someone else wrote never runs their code
    store = store_for(building.cache_dir, s3_server)
    parts = [uri for uri in store.list_files(building.cache_dir) if uri.endswith(".parquet")]
    assert parts
    table = pq.read_table(io.BytesIO(store.read_bytes(parts[0])))
    assert table.schema.field("meta").type == pa.large_string()
    metas = [m for m in table.column("meta").to_pylist() if m]
    assert metas and all(isinstance(json.loads(m), dict) for m in metas)
    cfg.data.num_frames = 4  # another sampling config: another cache key, decoded again
    assert not FrameStream(cfg, mode="train", epoch=3).cache_hit


def test_mp4_stream_skips_a_truncated_video(synthetic_revos, tmp_path):
    root = tmp_path / "revos_mp4"
    shutil.copytree(synthetic_revos, root, ignore=shutil.ignore_patterns("JPEGImages"))
    jpeg = open_dataset("revos", str(synthetic_revos), "valid")
    dataset = open_dataset("revos", str(root), "valid")  # sizes and frame lists come from the expression file
    for video in dataset.video_names:
        path = video_uri(dataset, video)
        write_mp4(Path(path), jpeg.read_frames(video))
    cut_video = dataset.video_names[0]
    truncate(Path(video_uri(dataset, cut_video)), 0.5)

    cfg = _config(str(root), video_format="mp4")
    stream = FrameStream(cfg, mode="eval")
    got = {s.key: s for s in stream}

    spec = sampling_spec(cfg, "eval")
    cut = {sample_key(r) for r in dataset.expressions() if r.video == cut_video}
    assert cut and set(got) == {sample_key(r) for r in dataset.expressions()} - cut
    assert stream.stats.skipped == {"truncated_video": len(cut)}
    for record in dataset.expressions():
        if record.video != cut_video:
            assert_same_sample(
                got[sample_key(record)], build_sample(dataset, record, spec, video_format="mp4")
            )
