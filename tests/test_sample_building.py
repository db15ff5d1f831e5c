"""Sample building: frame choice from frame_sampling, only sampled frames decoded, GT at 560, determinism."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from veason_ray.boxes import ground_truth_boxes_560, resize_masks_nearest
from veason_ray.datasets import open_dataset
from veason_ray.frame_sampling import sample_evaluation_frames, sample_training_frames, top_area_frames
from veason_ray.frames import resize_frames
from veason_ray.sample_building import (
    MissingMaskError,
    SamplingSpec,
    build_material,
    build_sample,
    gt_union_areas,
    sample_key,
    sample_rng,
)

TRAIN = SamplingSpec(mode="train", num_frames=6, seed=3)
EVAL = SamplingSpec(mode="eval", num_frames=8)


@pytest.fixture(scope="module")
def revos(synthetic_revos):
    return open_dataset("revos", str(synthetic_revos), "train")


def test_gt_union_areas_from_rles_match_decoded_masks(revos):
    records = list(revos.expressions())
    assert any(r.is_multi_instance for r in records)  # the union (pycocotools merge) path is covered
    for record in records:
        decoded = revos.gt_masks(record).reshape(revos.video(record.video).num_frames, -1).sum(axis=1)
        assert np.array_equal(gt_union_areas(revos, record), decoded)


def test_eval_sample_is_the_local_read(revos):
    for record in list(revos.expressions())[:6]:
        sample = build_sample(revos, record, EVAL)
        info = revos.video(record.video)
        indices = sample_evaluation_frames(info.num_frames, 8)
        assert sample.frame_indices == indices and sample.keyframe is None
        assert np.array_equal(sample.frames, resize_frames(revos.read_frames(record.video, indices), 560))
        assert np.array_equal(sample.gt_masks_560, resize_masks_nearest(revos.gt_masks(record, indices), 560))
        objects = revos.object_masks(record, indices)
        for t, boxes in enumerate(sample.gt_boxes_560):
            assert np.array_equal(boxes, ground_truth_boxes_560(objects[:, t]))
        assert sample.key == sample_key(record) and sample.original_size == (info.height, info.width)


def test_train_sample_uses_frame_sampling_and_is_deterministic(revos, monkeypatch):
    for record in list(revos.expressions())[:6]:
        areas = gt_union_areas(revos, record)
        for epoch in (0, 1):
            sample = build_sample(revos, record, TRAIN, epoch)
            expected = sample_training_frames(areas, sample_rng(3, sample_key(record), epoch), 6)
            assert (sample.frame_indices, sample.keyframe) == (expected.frame_indices, expected.keyframe)
            assert sample.keyframe in top_area_frames(areas)
            again = build_sample(revos, record, TRAIN, epoch)
            assert again.frame_indices == sample.frame_indices and np.array_equal(again.frames, sample.frames)
    # only the sampled frames are decoded
    read = []
    original = revos.store.read_bytes
    monkeypatch.setattr(revos.store, "read_bytes", lambda uri: read.append(uri) or original(uri))
    sample = build_sample(revos, record, TRAIN, 0)
    info = revos.video(record.video)
    assert [u for u in read if u.endswith(".jpg")] == [info.frame_uris[i] for i in sample.frame_indices]


def test_candidate_material_gives_every_epoch_exactly(revos):
    for record in list(revos.expressions())[:4]:
        material = build_material(revos, record, TRAIN)  # epoch None: the candidate frames
        assert len(material.frame_indices) <= 6 * 5  # a grid of 6 through each of the 5 keyframe candidates
        for epoch in range(4):
            direct, drawn = build_sample(revos, record, TRAIN, epoch), material.draw(TRAIN, epoch)
            assert drawn.frame_indices == direct.frame_indices and drawn.keyframe == direct.keyframe
            assert np.array_equal(drawn.frames, direct.frames)
            assert np.array_equal(drawn.gt_masks_560, direct.gt_masks_560)


def test_missing_mask_entry_is_a_typed_skip(synthetic_revos, tmp_path):
    root = tmp_path / "revos"
    shutil.copytree(synthetic_revos, root)
    masks = json.loads((root / "mask_dict.json").read_text())
    dataset = open_dataset("revos", str(root), "train")
    record = next(iter(dataset.expressions()))
    del masks[record.anno_ids[0]]
    (root / "mask_dict.json").write_text(json.dumps(masks))
    dataset = open_dataset("revos", str(root), "train")
    for spec in (TRAIN, EVAL):
        with pytest.raises(MissingMaskError, match="missing"):
            build_sample(dataset, record, spec)
