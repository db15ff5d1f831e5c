"""The stages of `veason eval` (pipelines/evaluate.py): Ray Data UDFs, each on an actor pool of its own, that
run inference (`veason_ray/inference.py`) and then score it (`veason_ray/evaluation.py`).

    PolicyViewReader  (CPU)  a video and its expression ids -> the policy's view of the video (N sampled frames
                             at 560), and per expression the GT at those frames (reward) and its ground-truth
                             answer
    PolicyAnswerer    (vLLM) every expression's answer, greedy, a batch of videos in one engine call (the
                             rollout engine of training, `RolloutEngine.answer`)
    FrameReader       (CPU)  every frame of the video at its own resolution, decoded once for all expressions
    MaskPredictor     (SAM2) masks of every frame for every answer (the batched propagator encodes each video
                             once for all of its answers), reward parts on the sampled frames
    ExpressionScorer  (CPU, or a GPU share) J, F, R against the GT of every frame (metrics on the GPU when the
                             actor has one), mask PNGs, overlay videos; one output row per expression

Rows are one per video until the scorer (a video's frames are read once for all of its expressions); arrays
travel as bytes and the rest as JSON, never pickles. A video that cannot be read, or a stage that fails on it,
marks its expressions failed with the reason and the row flows on: the scorer reports each as a failed result.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from veason_ray.config import VeasonConfig
from veason_ray.datasets import DatasetFormatError, ExpressionRecord, ViCaSDataset, open_dataset
from veason_ray.eval_overlays import draw_overlay, overlay_name
from veason_ray.evaluation import (
    ExpressionResult,
    expression_result,
    failed_result,
    oracle_answer,
    reward_parts,
)
from veason_ray.inference import (
    PolicyInput,
    locate_answer,
    policy_frame_indices,
    policy_frames,
    propagate_answers,
)
from veason_ray.metrics import score_expression
from veason_ray.records import PromptGroup, Rollout, Sample
from veason_ray.reward_rules import reward_rules
from veason_ray.sample_building import read_ground_truth
from veason_ray.vicas_scoring import lgvis_entry
from veason_ray.video_decoding import BadDataError, SampleTimeoutError, frame_source, within_deadline

log = logging.getLogger(__name__)

ROW_SCHEMA = pa.schema(
    [
        ("video", pa.string()),
        ("meta", pa.large_string()),  # JSON: expressions, answers, rewards, shapes, errors, stage seconds
        ("frames", pa.large_binary()),  # (L, H, W, 3) uint8: every frame (FrameReader -> MaskPredictor)
        ("policy_frames", pa.large_binary()),  # (N, S, S, 3) uint8: the frames the policy sees
        ("gt_560", pa.large_binary()),  # (E, N, S, S) bool, packed: GT union masks at the sampled frames
        ("masks", pa.large_binary()),  # (R, L, H, W) bool, packed: predicted masks (answers, then oracles)
    ]
)
RESULT_SCHEMA = pa.schema([("key", pa.string()), ("result", pa.large_string())])
ARRAYS = ("frames", "policy_frames", "gt_560", "masks")
PACKED = ("gt_560", "masks")


@dataclass
class VideoRow:
    """One video on its way through the stages; `meta` is JSON-serialisable, arrays are None until made."""

    video: str
    meta: dict[str, Any]
    frames: np.ndarray | None = None
    policy_frames: np.ndarray | None = None
    gt_560: np.ndarray | None = None
    masks: np.ndarray | None = None
    expressions: list[dict[str, Any]] = field(init=False)

    def __post_init__(self) -> None:
        self.expressions = self.meta.setdefault("expressions", [])

    @property
    def error(self) -> str:
        return self.meta.get("error", "")

    def fail(self, error: str) -> None:
        """The whole video failed (every expression is reported with this error)."""
        self.meta["error"] = error
        self.frames = self.masks = None

    def live(self) -> list[tuple[int, dict[str, Any]]]:
        """(index, expression) of the expressions still being evaluated."""
        if self.error:
            return []
        return [(i, e) for i, e in enumerate(self.expressions) if not e.get("error")]

    def record(self, index: int) -> ExpressionRecord:
        return ExpressionRecord.from_json(self.expressions[index]["record"])

    def timed(self, stage: str, seconds: float) -> None:
        self.meta.setdefault("seconds", {})[stage] = round(seconds, 4)


def encode_rows(rows: list[VideoRow]) -> pa.Table:
    columns: dict[str, list[Any]] = {name: [] for name in ROW_SCHEMA.names}
    for row in rows:
        shapes = {}
        for name in ARRAYS:
            array = getattr(row, name)
            if array is None:
                columns[name].append(b"")
                continue
            shapes[name] = list(array.shape)
            data = np.packbits(array) if name in PACKED else np.ascontiguousarray(array)
            columns[name].append(data.tobytes())
        row.meta["shapes"] = shapes
        columns["video"].append(row.video)
        columns["meta"].append(json.dumps(row.meta))
    return pa.Table.from_pydict(columns, schema=ROW_SCHEMA)


def decode_rows(table: pa.Table) -> list[VideoRow]:
    rows = []
    for i in range(table.num_rows):
        meta = json.loads(table.column("meta")[i].as_py())
        row = VideoRow(table.column("video")[i].as_py(), meta)
        for name, shape in meta.pop("shapes", {}).items():
            buffer = table.column(name)[i].as_buffer()
            if name in PACKED:
                bits = np.unpackbits(np.frombuffer(buffer, np.uint8), count=int(np.prod(shape)))
                setattr(row, name, bits.reshape(shape).astype(bool))
            else:
                setattr(row, name, np.frombuffer(buffer, np.uint8).reshape(shape))
        rows.append(row)
    return rows


def video_items(records: list[ExpressionRecord]) -> list[dict[str, str]]:
    """The job's input: one item per video (in first-appearance order) with its expression ids as JSON."""
    by_video: dict[str, list[str]] = {}
    for record in records:
        by_video.setdefault(record.video, []).append(str(record.exp_id))
    return [{"video": v, "exp_ids": json.dumps(ids)} for v, ids in by_video.items()]


# What unreadable data raises: a video or mask the dataset cannot deliver fails its expressions, not the job.
BAD_DATA = (BadDataError, DatasetFormatError, OSError)
ENGINE_DIED = "engine_died"  # the error kind of expressions whose engine died twice under them


def _bad_data(error: Exception) -> str:
    if isinstance(error, BadDataError):
        return f"{error.reason}: {error}"
    if isinstance(error, DatasetFormatError):
        return f"bad_dataset_entry: {error}"
    return f"read_error: {type(error).__name__}: {error}"


class _DatasetStage:
    def __init__(self, cfg: VeasonConfig, split: str):
        import cv2

        cv2.setNumThreads(1)  # Ray gives each stage actor its own CPU(s)
        self.cfg = cfg
        self.dataset = open_dataset(cfg.data.dataset, cfg.data.root, split, cfg.storage)

    def _frames(self, video: str, indices: list[int] | None = None) -> np.ndarray:
        data = self.cfg.data
        info = self.dataset.video(video)
        source = frame_source(self.dataset, video, data.video_format, data.video_backend, info)
        return source.read(range(info.num_frames) if indices is None else indices)


class PolicyViewReader(_DatasetStage):
    """Stage 1 (CPU): items {video, exp_ids} -> rows with the policy's view (only the sampled frames are
    decoded), and per expression the GT at those frames and its ground-truth answer (also its `answer` when
    `eval.answers` is ground_truth)."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        items = zip(batch.column("video").to_pylist(), batch.column("exp_ids").to_pylist(), strict=True)
        return encode_rows([self.read_within_deadline(video, json.loads(ids)) for video, ids in items])

    def read_within_deadline(self, video: str, exp_ids: list[str]) -> VideoRow:
        """`read`, or a failed row (`timeout`) when it takes longer than data.sample_timeout_s."""
        try:
            return within_deadline(lambda: self.read(video, exp_ids), self.cfg.data.sample_timeout_s, video)
        except SampleTimeoutError as error:
            records = [self.dataset.expression(video, e) for e in exp_ids]
            row = VideoRow(video, {"expressions": [{"record": asdict(r)} for r in records]})
            row.fail(_bad_data(error))
            return row

    def read(self, video: str, exp_ids: list[str]) -> VideoRow:
        started = time.perf_counter()
        records = [self.dataset.expression(video, e) for e in exp_ids]
        row = VideoRow(video, {"expressions": [{"record": asdict(r)} for r in records]})
        data = self.cfg.data
        try:
            info = self.dataset.video(video)
            indices = policy_frame_indices(info.num_frames, data.eval_num_frames)
            view = policy_frames(self._frames(video, list(indices)), data.frame_size)
        except BAD_DATA as error:
            row.fail(_bad_data(error))
            return row
        gts = []
        for item, record in zip(row.expressions, records, strict=True):
            try:
                gt_masks, gt_boxes = read_ground_truth(self.dataset, record, indices, data.frame_size)
            except BAD_DATA as error:
                item["error"] = _bad_data(error)
                gts.append(np.zeros(view.shape[:3], bool))
                continue
            sample = Sample(record, indices, None, view, gt_masks, gt_boxes, (info.height, info.width),
                            info.num_frames)  # fmt: skip
            item["gt_boxes_560"] = [b.tolist() for b in gt_boxes]
            item["oracle"] = oracle_answer(sample, split_regions=self.dataset.kind == "reasonvos")
            if self.cfg.eval.answers == "ground_truth":
                item["answer"] = item["oracle"]
            gts.append(gt_masks)
        row.meta.update(frame_indices=list(indices), height=info.height, width=info.width)
        row.meta.update(num_frames=info.num_frames, frame_names=list(info.frame_names))
        row.policy_frames, row.gt_560 = view, np.stack(gts)
        row.timed("read_view", time.perf_counter() - started)
        return row


def _sample(row: VideoRow, index: int) -> Sample:
    """Expression `index` of the row as the reward scores it (its GT at the sampled frames)."""
    meta = row.meta
    return Sample(
        record=row.record(index),
        frame_indices=tuple(meta["frame_indices"]),
        keyframe=None,
        frames=row.policy_frames,
        gt_masks_560=row.gt_560[index],
        gt_boxes_560=[
            np.asarray(b, np.float64).reshape(-1, 4) for b in row.expressions[index]["gt_boxes_560"]
        ],
        original_size=(meta["height"], meta["width"]),
        num_video_frames=meta["num_frames"],
    )


class PolicyAnswerer:
    """Stage 2 (vLLM): the answers of a video's live expressions from one rollout engine in this actor
    (`RolloutEngine.answer`: greedy, constrained to the answer format with `inference.constrain_answer`).

    Ray Data sends each actor up to `eval.policy_batch_videos` videos at once, each call on its own thread; a
    `RequestBatcher` joins the calls that wait together into one engine call (vLLM batches all their prompts),
    while every video stays its own block downstream, so the SAM2 actors share the work. A vLLM that dies is
    rebuilt in place and the batch retried once; an engine error marks the batch's expressions failed."""

    def __init__(self, cfg: VeasonConfig):
        from actors.request_batching import RequestBatcher
        from actors.rollout import RolloutEngine
        from veason_ray.models.loading import resolve_model_dir

        self.cfg = cfg
        model_dir = resolve_model_dir(cfg.model.policy, cfg.storage, cfg.model.cache_dir or None)
        self.engine = RolloutEngine(str(model_dir), cfg.rollout, cfg.model.dtype, cfg.run.seed)
        self.batcher = RequestBatcher(
            self._answer_videos, max(1, cfg.eval.policy_batch_videos), 0.05, "policy-answers"
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = decode_rows(batch)
        for row in rows:
            slots = [item for _, item in row.live()]
            inputs = [
                PolicyInput(item["record"]["expression"], tuple(row.meta["frame_indices"]), row.policy_frames)
                for item in slots
            ]
            if not inputs:
                continue
            answers, batch_videos, seconds, error = self.batcher.submit(inputs)
            for index, item in enumerate(slots):
                if error:
                    item["error"] = error
                else:
                    item["answer"] = answers[index]
            row.meta["policy_batch_videos"] = batch_videos
            row.timed("policy", seconds)  # the engine call this video was part of
        return encode_rows(rows)

    def _answer_videos(self, videos: list[list[PolicyInput]]) -> list[tuple[list[str], int, float, str]]:
        """One engine call for every waiting video's inputs: per video (answers, videos in the call, its
        seconds, error). A request error (not a dead engine) fails the call of all of them, so each video is
        then asked alone: only the videos whose own request fails are reported failed."""
        started = time.perf_counter()
        texts, error = self._answer(videos)
        if error and len(videos) > 1 and not error.startswith(ENGINE_DIED):
            return [self._answer_videos([inputs])[0] for inputs in videos]
        seconds = time.perf_counter() - started
        if error:
            return [([], len(videos), seconds, error) for _ in videos]
        answers = iter(texts)
        return [([next(answers) for _ in inputs], len(videos), seconds, "") for inputs in videos]

    def _answer(self, videos: list[list[PolicyInput]]) -> tuple[list[str], str]:
        """(answers, "") or ([], error). A vLLM that dies is rebuilt in place and the call retried once."""
        from actors.engine_health import RolloutEngineDead

        flat = [item for inputs in videos for item in inputs]
        error = ""
        for attempt in range(2):
            try:
                return self.engine.answer(flat, self.cfg.inference), ""
            except RolloutEngineDead as dead:
                error = f"{ENGINE_DIED}: {dead}"
                if attempt == 0:
                    log.warning("policy engine died (%s); restarting it in place", dead)
                    self.engine.restart_engine()
            except Exception as failure:  # noqa: BLE001 - reported per expression, the job goes on
                return [], f"engine_error: {type(failure).__name__}: {failure}"
        return [], error


class FrameReader(_DatasetStage):
    """Stage 3 (CPU): every frame of the row's video at its own resolution, once for all of its expressions."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = decode_rows(batch)
        for row in rows:
            if not row.live():
                continue
            started = time.perf_counter()
            try:
                row.frames = within_deadline(
                    lambda video=row.video: self._frames(video), self.cfg.data.sample_timeout_s, row.video
                )
            except BAD_DATA as error:
                row.fail(_bad_data(error))
            row.timed("read_frames", time.perf_counter() - started)
        return encode_rows(rows)


class MaskPredictor:
    """Stage 4 (SAM2, or the synthetic world's colour tracker: `reward.propagator`): masks of every frame for
    every answer and, with `eval.score_oracle`, every ground-truth answer, through `inference.propagate_answers`
    on the batched propagator (each video encoded once for all its answers); the reward parts of each answer
    on the sampled frames (`score_groups`, one shared pass). The frames are dropped from the row here."""

    def __init__(self, cfg: VeasonConfig):
        from veason_ray.models.propagator_choice import mask_propagator_for

        self.cfg = cfg
        self.propagator = mask_propagator_for(cfg, batched=True)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = decode_rows(batch)
        for row in rows:
            started = time.perf_counter()
            try:
                self._predict(row)
            except Exception as error:  # noqa: BLE001 - the video's expressions are reported failed
                log.warning("mask prediction failed on %s: %s: %s", row.video, type(error).__name__, error)
                row.fail(f"propagation_error: {type(error).__name__}: {error}")
            row.frames = None
            row.timed("propagate", time.perf_counter() - started)
        return encode_rows(rows)

    def _predict(self, row: VideoRow) -> None:
        from veason_ray.models.group_scoring import GroupInput, score_groups

        live = row.live()
        if not live:
            return
        height, width, count = row.meta["height"], row.meta["width"], row.meta["num_frames"]
        texts = [item["answer"] for _, item in live]
        if self.cfg.eval.score_oracle:
            texts += [item["oracle"] for _, item in live]
        located = [(0, locate_answer(text, count, height, width)) for text in texts]
        masks = propagate_answers({0: row.frames}, located, self.propagator)
        row.masks = np.stack(masks)
        groups = [
            GroupInput(
                PromptGroup(index, _sample(row, index)),
                [_rollout(index, r, t) for r, t in enumerate(texts[k :: len(live)])],
                row.policy_frames,
            )
            for k, (index, _) in enumerate(live)
        ]
        rules = reward_rules(self.cfg.reward.rules)
        for (_, item), scored in zip(
            live, score_groups(groups, self.propagator, self.cfg.reward.weights, rules), strict=True
        ):
            item["rewards"] = reward_parts(scored[0].reward)
            item["consistency_error"] = scored[0].reward.consistency_error
            if len(scored) > 1:
                item["oracle_rewards"] = reward_parts(scored[1].reward)


def _rollout(group_id: int, index: int, text: str) -> Rollout:
    """An answer as the reward code takes it (no tokens: they are not scored)."""
    return Rollout(group_id, index, text, [], [], "stop", 0)


class ExpressionScorer(_DatasetStage):
    """Stage 5 (CPU, or a GPU share with `eval.scorer_gpus`): one result per expression: J, F and R of its masks
    against the GT of every frame (the foreground read once per video), the oracle's J&F, its masks as PNGs
    (`masks/<video>/<exp_id>/<frame>.png`, 0/255, the public evaluation tools' layout) and, for the keys in
    `eval.overlays`, an overlay video. ViCaS is scored on its human-annotated frames, with what its track mAP
    needs (`vicas_scoring.lgvis_entry`) in the result's extra."""

    def __init__(self, cfg: VeasonConfig, split: str, output_uri: str):
        import torch

        super().__init__(cfg, split)
        self.output_uri = output_uri  # a folder or an s3:// URI: masks and overlays are written there
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.overlays = set(cfg.eval.overlays)

    def __call__(self, batch: pa.Table) -> pa.Table:
        keys, docs = [], []
        for row in decode_rows(batch):
            for result in self.score(row):
                keys.append(result.key)
                docs.append(json.dumps(result.as_json()))
        return pa.Table.from_pydict({"key": keys, "result": docs}, schema=RESULT_SCHEMA)

    def score(self, row: VideoRow) -> list[ExpressionResult]:
        live = dict(row.live())
        results = []
        foreground = None
        for index, item in enumerate(row.expressions):
            record = row.record(index)
            if index not in live:
                results.append(failed_result(record, row.error or item["error"]))
                continue
            try:
                if foreground is None:
                    foreground = self.dataset.foreground(row.video)
                results.append(self._score(row, index, list(live).index(index), len(live), foreground))
            except Exception as error:  # noqa: BLE001 - reported as this expression's failure
                results.append(failed_result(record, f"scoring_error: {type(error).__name__}: {error}"))
        return results

    def _score(self, row: VideoRow, index: int, position: int, live: int, foreground: np.ndarray):
        from veason_ray.mask_io import write_mask_pngs
        from veason_ray.object_store import is_s3_uri, join_uri, store_for

        started = time.perf_counter()
        record, item, meta = row.record(index), row.expressions[index], row.meta
        gt = self.dataset.gt_masks(record)
        masks = row.masks[position]
        scored = self._scored_frames(record.video)
        score = score_expression(
            masks[scored], gt[scored], record.type_id, foreground[scored], device=self.device
        )
        answer = locate_answer(item["answer"], meta["num_frames"], meta["height"], meta["width"])
        result = expression_result(
            record, tuple(meta["frame_indices"]), answer, item["rewards"], item["consistency_error"], score
        )
        result.extra["seconds"] = dict(meta.get("seconds", {}))
        if isinstance(self.dataset, ViCaSDataset):
            result.extra["lgvis"] = lgvis_entry(masks[scored], self.dataset.object_masks(record, scored))
        if "oracle_rewards" in item:
            oracle = score_expression(
                row.masks[live + position][scored], gt[scored], record.type_id, device=self.device
            )
            result.extra["oracle"] = {
                "rewards": item["oracle_rewards"],
                "j": oracle.j,
                "f": oracle.f,
                "jf": oracle.jf,
            }
        if self.cfg.eval.write_masks:
            folder = join_uri(self.output_uri, "masks", record.video, str(record.exp_id))
            write_mask_pngs(store_for(folder, self.cfg.storage), folder, masks, meta["frame_names"])
        if result.key in self.overlays:
            uri = join_uri(self.output_uri, "overlays", overlay_name(result.key))
            frames = self.dataset.read_frames(record.video)
            if is_s3_uri(uri):
                with tempfile.TemporaryDirectory() as scratch:
                    path = draw_overlay(
                        Path(scratch) / "overlay.mp4", frames, masks, gt, result, self.cfg.infer.fps
                    )
                    still = join_uri(self.output_uri, "overlays", overlay_name(result.key, ".png"))
                    for target, source in ((uri, path), (still, path.with_suffix(".png"))):
                        store_for(target, self.cfg.storage).write_bytes(target, source.read_bytes())
            else:
                draw_overlay(Path(uri), frames, masks, gt, result, self.cfg.infer.fps)
            result.extra["overlay"] = uri
        result.extra["seconds"]["score"] = round(time.perf_counter() - started, 4)
        return result

    def _scored_frames(self, video: str) -> slice | list[int]:
        """The frames an expression is scored on: every frame (a slice), or ViCaS's human-annotated ones."""
        if isinstance(self.dataset, ViCaSDataset):
            return list(self.dataset.benchmark_frames(video))
        return slice(None)
