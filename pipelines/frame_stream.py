"""Ray Data frame streaming: dataset records -> decoded, resized, ground-truthed samples, one batch at a time.

    for groups in iter_prompt_groups(cfg, epoch=0, batch_size=16):    # the GRPO driver: lists of PromptGroup
        ...
    for sample in FrameStream(cfg, mode="eval"):                      # the evaluation split's Samples
        ...

The pipeline: ``from_items`` of expression keys (a few bytes each) -> ``map_batches`` on a pool of
``data.decode_concurrency`` SampleDecoder actors (``data.decode_num_cpus`` each; every actor opens the dataset
reader once, so mask files are parsed once per actor) that decode only the frames a sample needs, resize them to
560x560 and attach the GT -> one Arrow row per expression (frames and bit-packed masks as binary values, the
rest as JSON; or a skip reason) -> the consumer turns rows into :class:`~veason_ray.records.Sample`s. Ray Data's streaming
executor keeps a bounded number of blocks in flight, so the dataset is never materialised; rows live in Ray's
object store once, the consumer gets them zero-copy. Rows arrive in the order of the stream's records whichever
decoding actor finishes first (Ray Data's ``preserve_order``), so the same seed gives the same batches.

Bad data (a corrupt JPEG, a truncated video, a missing mask entry, an unreadable object) is a row with a
``skip_reason``: counted in :class:`StreamStats` (``as_metrics()``), logged with the sample key, and skipped.

Cache (``data.cache_uri``, local or s3://): the first pass writes each decoded batch as a Parquet file (named by
a hash of its keys) under ``<cache_uri>/<split>-<mode>-<key>/parts/`` and, once the stream is fully consumed,
``_SUCCESS.json``; later passes read the Parquet files instead of decoding. ``key`` hashes the dataset (kind,
root, split, expression keys), the sampling config, the video format and CACHE_FORMAT. Training rows hold the
*candidate* frames of each expression (every frame any epoch's keyframe draw can pick, at most N * k), so every
epoch's sample is exact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from pyarrow import fs as pafs

from veason_ray.config import DataConfig, StorageConfig, VeasonConfig
from veason_ray.datasets import ExpressionRecord, open_dataset, select_expressions
from veason_ray.object_store import S3_SCHEME, S3ObjectStore, join_uri, store_for
from veason_ray.records import PromptGroup, Sample
from veason_ray.sample_building import FrameMaterial, Mode, SamplingSpec, build_material, sample_key
from veason_ray.video_decoding import BadDataError, within_deadline

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # bump when the row layout or the decoding changes: old caches are then ignored
READ_ERROR = "read_error"  # skip reason of an object that storage could not deliver (after its retries)
ROW_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("skip_reason", pa.string()),
        ("skip_detail", pa.string()),
        ("frames", pa.large_binary()),  # (T, S, S, 3) uint8 C-order bytes; empty for a skip
        ("masks", pa.large_binary()),  # (T, S, S) bool GT union masks, np.packbits
        # record fields, indices, shapes, boxes, areas as JSON: a cache others can write to must never be
        # unpickled (that would run their code); JSON floats round-trip float64 exactly.
        ("meta", pa.large_string()),
    ]
)


# --- rows: one expression's decoded material, or why it was skipped ------------------------------------------
def encode_material(material: FrameMaterial) -> dict[str, Any]:
    """A FrameMaterial as a row of ROW_SCHEMA (masks bit-packed, 8x smaller)."""
    meta = {
        "record": asdict(material.record),
        "frame_indices": [int(i) for i in material.frame_indices],
        "frames_shape": list(material.frames.shape),
        "masks_shape": list(material.gt_masks.shape),
        "boxes": [np.asarray(b, dtype=np.float64).tolist() for b in material.gt_boxes],
        "areas": None if material.areas is None else np.asarray(material.areas).tolist(),
        "original_size": [int(v) for v in material.original_size],
        "num_video_frames": int(material.num_video_frames),
    }
    return {
        "key": sample_key(material.record),
        "skip_reason": "",
        "skip_detail": "",
        "frames": np.ascontiguousarray(material.frames).tobytes(),
        "masks": np.packbits(material.gt_masks).tobytes(),
        "meta": json.dumps(meta),
    }


def skip_row(key: str, reason: str, detail: str) -> dict[str, Any]:
    return {"key": key, "skip_reason": reason, "skip_detail": detail, "frames": b"", "masks": b"", "meta": ""}


def decode_material(frames: pa.Buffer | bytes, masks: pa.Buffer | bytes, meta_text: str) -> FrameMaterial:
    """The inverse of :func:`encode_material`; the frames are a read-only view of ``frames`` (no copy)."""
    meta = json.loads(meta_text)
    record = ExpressionRecord.from_json(meta["record"])
    masks_shape = tuple(meta["masks_shape"])
    packed = np.frombuffer(masks, np.uint8)
    gt_masks = np.unpackbits(packed, count=int(np.prod(masks_shape))).reshape(masks_shape).astype(bool)
    return FrameMaterial(
        record=record,
        frame_indices=tuple(meta["frame_indices"]),
        frames=np.frombuffer(frames, np.uint8).reshape(meta["frames_shape"]),
        gt_masks=gt_masks,
        gt_boxes=[np.asarray(b, dtype=np.float64).reshape(-1, 4) for b in meta["boxes"]],
        areas=None if meta["areas"] is None else np.asarray(meta["areas"], dtype=np.int64),
        original_size=tuple(meta["original_size"]),
        num_video_frames=meta["num_video_frames"],
    )


def _arrow_location(uri: str, storage: StorageConfig | None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path of a local path or s3:// URI (the ObjectStore's own S3 filesystem)."""
    store = store_for(uri, storage)
    if isinstance(store, S3ObjectStore):
        return store.filesystem, uri[len(S3_SCHEME) :].rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


class SampleDecoder:
    """The Ray Data UDF (one instance per decoding actor): a batch of expression keys -> a table of rows."""

    def __init__(
        self,
        data: DataConfig,
        storage: StorageConfig,
        split: str,
        spec: SamplingSpec,
        epoch: int | None,
        cache_parts: str | None,
    ):
        cv2.setNumThreads(
            1
        )  # Ray gives each decoder its own CPU(s); OpenCV's thread pool would oversubscribe
        self.data, self.storage, self.spec, self.epoch = data, storage, spec, epoch
        self.dataset = open_dataset(data.dataset, data.root, split, storage)
        self.cache_parts = cache_parts

    def _row(self, video: str, exp_id: str) -> dict[str, Any]:
        record = self.dataset.expression(video, exp_id)
        key = sample_key(record)
        try:
            material = within_deadline(
                lambda: build_material(
                    self.dataset,
                    record,
                    self.spec,
                    self.epoch,
                    None,
                    self.data.video_format,
                    self.data.video_backend,
                ),
                self.data.sample_timeout_s,
                key,
            )
        except BadDataError as e:
            return skip_row(key, e.reason, str(e))
        except (
            OSError
        ) as e:  # storage failed after its own retries; the message names the URI, no credentials
            return skip_row(key, READ_ERROR, f"{type(e).__name__}: {e}")
        return encode_material(material)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        rows = [self._row(str(v), str(e)) for v, e in zip(batch["video"], batch["exp_id"], strict=True)]
        table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
        if self.cache_parts:
            filesystem, path = _arrow_location(self.cache_parts, self.storage)
            # named by content: the same cache built twice reads back in the same (seeded) file order
            name = hashlib.sha256("\n".join(table.column("key").to_pylist()).encode("utf-8")).hexdigest()[:16]
            pq.write_table(table, f"{path}/part-{name}.parquet", filesystem=filesystem)
        return table


# --- what the consumer counts ----------------------------------------------------------------------------------
@dataclass
class StreamStats:
    """Samples delivered, frames in them, skipped expressions by reason (and their keys, in the order met);
    throughput since the first row. A resumed run's stats count on from a checkpoint's ``counts()``."""

    samples: int = 0
    frames: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_keys: list[str] = field(default_factory=list)
    progress_every_s: float = 0.0
    started: float | None = None
    # samples and frames counted by an earlier process (a resumed run): in the totals, not in this one's rates
    carried_samples: int = 0
    carried_frames: int = 0
    _last_log: float = 0.0

    @classmethod
    def resumed(cls, counts: dict[str, Any], progress_every_s: float = 0.0) -> StreamStats:
        """Stats counting on from ``counts`` (what ``counts()`` returned; ``{}``: from 0)."""
        samples, frames = int(counts.get("samples", 0)), int(counts.get("frames", 0))
        skipped = Counter({reason: int(n) for reason, n in counts.get("skipped", {}).items()})
        stats = cls(samples, frames, skipped, progress_every_s=progress_every_s)
        stats.carried_samples, stats.carried_frames = samples, frames
        return stats

    def counts(self) -> dict[str, Any]:
        """What a checkpoint keeps (JSON): samples, frames, skipped expressions per reason."""
        return {"samples": self.samples, "frames": self.frames, "skipped": dict(self.skipped)}

    def _tick(self) -> None:
        now = time.monotonic()
        if self.started is None:
            self.started = self._last_log = now
        if self.progress_every_s > 0 and now - self._last_log >= self.progress_every_s:
            self._last_log = now
            log.info("%s", self.progress_line())

    def add_sample(self, sample: Sample) -> None:
        self.samples += 1
        self.frames += len(sample.frame_indices)
        self._tick()

    def add_skip(self, key: str, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        self.skipped_keys.append(key)
        log.warning("skipped %s (%s): %s", key, reason, detail)
        self._tick()

    @property
    def elapsed_s(self) -> float:
        return 0.0 if self.started is None else time.monotonic() - self.started

    def _rates(self) -> tuple[float, float]:
        """Samples and frames per second of this process."""
        elapsed = max(self.elapsed_s, 1e-9)
        return (self.samples - self.carried_samples) / elapsed, (self.frames - self.carried_frames) / elapsed

    def as_metrics(self, prefix: str = "data/") -> dict[str, float]:
        """Counts and rates as run metrics: samples, frames, skipped (total and per reason), per second."""
        samples_per_s, frames_per_s = self._rates()
        out = {
            f"{prefix}samples": float(self.samples),
            f"{prefix}frames": float(self.frames),
            f"{prefix}skipped": float(sum(self.skipped.values())),
            f"{prefix}samples_per_s": samples_per_s,
            f"{prefix}frames_per_s": frames_per_s,
        }
        out.update({f"{prefix}skipped/{reason}": float(n) for reason, n in sorted(self.skipped.items())})
        return out

    def progress_line(self) -> str:
        samples_per_s, frames_per_s = self._rates()
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "none"
        return (
            f"frame stream: {self.samples} samples, {self.frames} frames in {self.elapsed_s:.1f} s "
            f"({samples_per_s:.1f} samples/s, {frames_per_s:.1f} frames/s); skipped: {skipped}"
        )


def samples_from_batches(
    batches: Iterator[pa.Table], spec: SamplingSpec, epoch: int, stats: StreamStats
) -> Iterator[Sample]:
    """Rows -> Samples (the draw of ``epoch``), counting skips in ``stats``."""
    for table in batches:
        keys, reasons, details = (table.column(c).to_pylist() for c in ("key", "skip_reason", "skip_detail"))
        frames, masks, metas = table.column("frames"), table.column("masks"), table.column("meta")
        for i, key in enumerate(keys):
            if reasons[i]:
                stats.add_skip(key, reasons[i], details[i])
                continue
            material = decode_material(frames[i].as_buffer(), masks[i].as_buffer(), metas[i].as_py())
            sample = material.draw(spec, epoch)
            stats.add_sample(sample)
            yield sample


# --- the stream ------------------------------------------------------------------------------------------------
def sampling_spec(cfg: VeasonConfig, mode: Mode) -> SamplingSpec:
    """The SamplingSpec of ``mode`` from the config (train: data.num_frames; eval: data.eval_num_frames)."""
    data = cfg.data
    return SamplingSpec(
        mode=mode,
        num_frames=data.num_frames if mode == "train" else data.eval_num_frames,
        keyframe_top_k=data.keyframe_top_k,
        frame_size=data.frame_size,
        seed=cfg.run.seed,
    )


def cache_key(data: DataConfig, split: str, spec: SamplingSpec, keys: Sequence[str]) -> str:
    """A hash of everything the cached rows depend on (not the seed: rows hold every epoch's candidates)."""
    doc = {
        "format": CACHE_FORMAT,
        "dataset": data.dataset,
        "root": data.root.rstrip("/"),
        "split": split,
        "mode": spec.mode,
        "num_frames": spec.num_frames,
        "keyframe_top_k": spec.keyframe_top_k,
        "frame_size": spec.frame_size,
        "video_format": data.video_format,
        "expressions": hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest(),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode("utf-8")).hexdigest()[:16]


class FrameStream:
    """One pass over a split as Samples. ``records``: the expressions (default: the split's, filtered by
    data.expression_types, capped by data.max_expressions in training or eval.max_expressions in evaluation).

    Iterate it (one consumer); ``stats`` counts what was delivered and skipped."""

    def __init__(
        self,
        cfg: VeasonConfig,
        split: str | None = None,
        mode: Mode = "train",
        epoch: int = 0,
        records: Sequence[ExpressionRecord] | None = None,
        exclude: frozenset[str] = frozenset(),
    ):
        data = cfg.data
        self.cfg, self.mode, self.epoch = cfg, mode, epoch
        self.split = split or (data.train_split if mode == "train" else data.eval_split)
        self.spec = sampling_spec(cfg, mode)
        if records is None:
            limit = data.max_expressions if mode == "train" else cfg.eval.max_expressions
            dataset = open_dataset(data.dataset, data.root, self.split, cfg.storage)
            records = select_expressions(
                list(dataset.expressions()), data.expression_types, limit, cfg.run.seed
            )
        self.records = list(records)
        if mode == "train" and data.shuffle:
            order = np.random.default_rng([cfg.run.seed, epoch]).permutation(len(self.records))
            self.records = [self.records[i] for i in order]
        if exclude:  # a resumed epoch: what the interrupted run already trained on is left out
            self.records = [r for r in self.records if sample_key(r) not in exclude]
        self.stats = StreamStats(progress_every_s=data.progress_every_s)
        self.cache_dir: str | None = None
        if data.cache_uri:
            key = cache_key(data, self.split, self.spec, [sample_key(r) for r in self.records])
            self.cache_dir = join_uri(data.cache_uri, f"{self.split}-{mode}-{key}")
        self._building_cache = False

    @property
    def cache_hit(self) -> bool:
        """True when a complete cache for this stream exists (it is read instead of decoding)."""
        if self.cache_dir is None:
            return False
        return store_for(self.cache_dir, self.cfg.storage).exists(join_uri(self.cache_dir, "_SUCCESS.json"))

    def dataset(self) -> ray.data.Dataset:
        """The lazy Ray Dataset of rows (ROW_SCHEMA) in the order of ``records`` (or, from the cache, of the
        seeded file order); nothing runs until it is consumed."""
        ds = self._unordered_dataset()
        # Ray Data yields blocks as they finish, across decoding actors: the order (so the batches and the group
        # ids that seed sampling) would follow timing. In order, a slow block holds back only what follows it.
        ds.context.execution_options.preserve_order = True
        return ds

    def _unordered_dataset(self) -> ray.data.Dataset:
        data, storage = self.cfg.data, self.cfg.storage.resolved()
        if self.cache_hit:
            filesystem, path = _arrow_location(join_uri(self.cache_dir, "parts"), storage)
            files = sorted(i.path for i in filesystem.get_file_info(pafs.FileSelector(path)) if i.is_file)
            if self.mode == "train" and data.shuffle:  # file order, not a global shuffle: stays streaming
                files = [
                    files[i]
                    for i in np.random.default_rng([self.cfg.run.seed, self.epoch]).permutation(len(files))
                ]
            log.info("frame stream: reading cached frames from %s (%d files)", self.cache_dir, len(files))
            return ray.data.read_parquet(files, filesystem=filesystem)
        parts = None
        if self.cache_dir is not None:
            parts = join_uri(self.cache_dir, "parts")
            filesystem, path = _arrow_location(parts, storage)
            filesystem.create_dir(path, recursive=True)
            filesystem.delete_dir_contents(path, missing_dir_ok=True)  # a pass that never finished
            self._building_cache = True
        items = [{"video": r.video, "exp_id": r.exp_id} for r in self.records]
        batch = max(1, data.decode_batch_size)
        ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // batch)))
        return ds.map_batches(
            SampleDecoder,
            fn_constructor_kwargs={
                "data": data,
                "storage": storage,
                "split": self.split,
                "spec": self.spec,
                "epoch": None if parts else self.epoch,  # the cache holds every epoch's candidate frames
                "cache_parts": parts,
            },
            batch_size=batch,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=max(1, data.decode_concurrency)),
            num_cpus=data.decode_num_cpus,
        )

    def finish(self) -> None:
        """Mark the cache complete after every row was consumed (called by ``__iter__`` at its end)."""
        if self._building_cache:
            store = store_for(self.cache_dir, self.cfg.storage)
            doc = {"format": CACHE_FORMAT, "expressions": len(self.records), "written_unix": time.time()}
            store.write_bytes(join_uri(self.cache_dir, "_SUCCESS.json"), json.dumps(doc).encode("utf-8"))
            self._building_cache = False

    def __iter__(self) -> Iterator[Sample]:
        data = self.cfg.data
        batches = self.dataset().iter_batches(
            batch_size=max(1, data.decode_batch_size),
            batch_format="pyarrow",
            prefetch_batches=data.prefetch_batches,
        )
        yield from samples_from_batches(batches, self.spec, self.epoch, self.stats)
        self.finish()
        if data.progress_every_s > 0:
            log.info("%s", self.stats.progress_line())


def iter_prompt_groups(
    cfg: VeasonConfig,
    split: str | None = None,
    epoch: int = 0,
    batch_size: int | None = None,
    first_group_id: int = 0,
    put_frames: bool = False,
    stats: StreamStats | None = None,
    exclude: frozenset[str] = frozenset(),
) -> Iterator[list[PromptGroup]]:
    """The GRPO driver's input: lists of ``batch_size`` (default trainer.prompts_per_step) PromptGroups of the
    training split for ``epoch``; the last list may be shorter. ``put_frames``: each sample's frames are put in
    Ray's object store once and travel as a reference. ``stats`` (optional) receives the stream's counts.
    ``exclude``: sample keys (``Sample.key``) to leave out, e.g. those a resumed run already consumed."""
    stream = FrameStream(cfg, split, "train", epoch, exclude=exclude)
    if stats is not None:
        stream.stats = stats
    size = batch_size or cfg.trainer.prompts_per_step
    group: list[PromptGroup] = []
    for sample in stream:
        if put_frames:
            sample.frames = ray.put(sample.frames)
        group.append(PromptGroup(group_id=first_group_id, sample=sample))
        first_group_id += 1
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group
