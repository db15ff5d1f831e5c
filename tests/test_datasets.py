"""Dataset readers (ReVOS, MeViS, ReasonVOS), local and s3://, on synthetic and hand-written files."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import as_mevis
from pycocotools import mask as mask_utils

from veason_ray.datasets import (
    DatasetFormatError,
    RLEFormatError,
    decode_rle,
    encode_mask,
    open_dataset,
    union_masks,
)
from veason_ray.object_store import join_uri, store_for

# --- RLE ----------------------------------------------------------------------------------------------


def _random_masks(rng: np.random.Generator) -> list[np.ndarray]:
    masks = [np.zeros((7, 5), bool), np.ones((7, 5), bool), np.zeros((1, 1), bool), np.ones((1, 1), bool)]
    for _ in range(40):
        h, w = rng.integers(1, 60, size=2)
        masks.append(rng.random((h, w)) < rng.random())
    blob = np.zeros((50, 80), bool)
    blob[10:30, 5:70] = True
    masks.append(blob)
    return masks


def test_rle_round_trip_is_exact():
    rng = np.random.default_rng(0)
    for mask in _random_masks(rng):
        rle = encode_mask(mask)
        assert isinstance(rle["counts"], str) and rle["size"] == list(mask.shape)
        assert np.array_equal(decode_rle(json.loads(json.dumps(rle))), mask)
        # the same string as pycocotools itself writes, and it decodes ours identically
        ref = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert ref["counts"].decode() == rle["counts"]
        assert np.array_equal(
            mask_utils.decode(ref).astype(bool), decode_rle({**rle, "counts": ref["counts"]})
        )


def _uncompressed(mask: np.ndarray) -> dict:
    flat = mask.flatten(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]]))) if flat.size else []
    runs = np.diff(np.concatenate([[0], change])).tolist()
    if runs and runs[-1] == 0:
        runs = runs[:-1]
    assert sum(runs) == mask.size
    return {"size": list(mask.shape), "counts": [int(r) for r in runs]}


def test_rle_uncompressed_counts_and_union():
    rng = np.random.default_rng(1)
    for mask in _random_masks(rng):
        assert np.array_equal(decode_rle(_uncompressed(mask)), mask)
    a, b = rng.random((2, 9, 11)) < 0.3
    assert np.array_equal(union_masks([a, b], (9, 11)), a | b)
    assert not union_masks([], (9, 11)).any()
    with pytest.raises(ValueError, match="shape"):
        union_masks([a], (11, 9))


@pytest.mark.parametrize(
    "rle, match",
    [
        ("abc", "expected an RLE object"),
        ({"size": [3], "counts": ""}, r"\.size: expected \[height, width\]"),
        ({"size": [2, 2]}, r"\.counts: missing"),
        ({"size": [2, 2], "counts": [1, 2]}, "sum to 3, expected height\\*width = 4"),
        ({"size": [2, 2], "counts": 5}, "expected str, bytes or list of int, got int"),
    ],
)
def test_rle_errors_say_where(rle, match):
    with pytest.raises(RLEFormatError, match=match) as info:
        decode_rle(rle, "mask_dict.json: ['7'][3]")
    assert str(info.value).startswith("mask_dict.json: ['7'][3]")


# --- ReVOS on the synthetic dataset ---------------------------------------------------------------------


def _check_revos_reader(root: str, storage=None) -> None:
    train = open_dataset("revos", root, "train", storage)
    valid = open_dataset("revos", root, "valid", storage)
    assert len(train.video_names) == 4 and len(valid.video_names) == 2
    assert not set(train.video_names) & set(valid.video_names)
    for ds in (train, valid):
        exprs = list(ds.expressions())
        assert len(exprs) == len(ds) > 0
        assert {e.type_id for e in exprs} <= {0, 1, 2}
        video = ds.video(exprs[0].video)
        assert video.num_frames == 12 and (video.height, video.width) == (120, 160)
        assert video.frame_names[0] == "00000" and video.frame_uris[3].endswith(f"{video.name}/00003.jpg")
        frame = ds.read_frame(video.name, 3)
        assert frame.shape == (120, 160, 3) and frame.dtype == np.uint8
        fg = ds.foreground(video.name)
        for e in ds.expressions_of(video.name):
            gt, objs = ds.gt_masks(e), ds.object_masks(e)
            assert gt.shape == (12, 120, 160) and gt.dtype == bool
            assert objs.shape == (len(e.obj_ids), 12, 120, 160)
            assert np.array_equal(gt, objs.any(axis=0))
            assert not (gt & ~fg).any()  # every target is part of the foreground
            if e.type_id == 2:
                assert not gt.any()
            else:
                assert gt.any()
            assert np.array_equal(ds.gt_masks(e, [5, 0]), gt[[5, 0]])


def test_revos_reader_local(synthetic_revos):
    _check_revos_reader(str(synthetic_revos))


def test_revos_reader_s3(synthetic_revos, s3_server, s3_bucket):
    root = join_uri(s3_bucket, "ReVOS")
    store_for(root, s3_server).upload_tree(synthetic_revos, root)
    _check_revos_reader(root, s3_server)
    local, remote = (
        open_dataset("revos", str(synthetic_revos)),
        open_dataset("revos", root, "train", s3_server),
    )
    assert list(local.expressions()) != [] and [
        (e.video, e.exp_id, e.expression, e.obj_ids, e.anno_ids) for e in local.expressions()
    ] == [(e.video, e.exp_id, e.expression, e.obj_ids, e.anno_ids) for e in remote.expressions()]
    e = next(remote.expressions())
    assert np.array_equal(remote.read_frames(e.video, [0, 11]), local.read_frames(e.video, [0, 11]))
    assert np.array_equal(remote.gt_masks(e), local.gt_masks(e))
    assert np.array_equal(remote.foreground(e.video), local.foreground(e.video))


def test_reader_pickles_without_its_caches(synthetic_revos):
    ds = open_dataset("revos", str(synthetic_revos))
    e = next(ds.expressions())
    gt = ds.gt_masks(e)
    assert ds._mask_dict is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._mask_dict is None
    assert np.array_equal(clone.gt_masks(e), gt)


def test_frame_index_and_unknown_names(synthetic_revos):
    ds = open_dataset("revos", str(synthetic_revos))
    e = next(ds.expressions())
    with pytest.raises(IndexError, match="out of range"):
        ds.gt_masks(e, [12])
    with pytest.raises(KeyError, match="no video"):
        ds.video("nope")
    with pytest.raises(ValueError, match="unknown dataset kind"):
        open_dataset("davis", str(synthetic_revos))
    assert ds.expression(e.video, e.exp_id) == e


# --- MeViS: the ReVOS files rearranged as MeViS ships them --------------------------------------------


def test_mevis_reader(synthetic_revos, tmp_path, s3_server, s3_bucket):
    root = as_mevis(synthetic_revos, tmp_path / "mevis")
    revos = open_dataset("revos", str(synthetic_revos), "train")
    remote = join_uri(s3_bucket, "mevis")
    store_for(remote, s3_server).upload_tree(root, remote)
    for mevis in (
        open_dataset("mevis", str(root), "train"),
        open_dataset("mevis", remote, "train", s3_server),
    ):
        assert len(mevis) == len(revos)
        for a, b in zip(mevis.expressions(), revos.expressions(), strict=True):
            assert (
                a.type_id is None
                and a.dataset == "mevis"
                and (a.expression, a.obj_ids) == (b.expression, b.obj_ids)
            )
        name = revos.video_names[0]
        assert (mevis.video(name).height, mevis.video(name).width) == (120, 160)  # read from the first frame
        e = mevis.expressions_of(name)[0]
        assert np.array_equal(mevis.gt_masks(e), revos.gt_masks(revos.expressions_of(name)[0]))
        # no foreground file: the union of every object the video's expressions refer to
        union = np.zeros((12, 120, 160), bool)
        for x in mevis.expressions_of(name):
            union |= mevis.gt_masks(x)
        assert np.array_equal(mevis.foreground(name), union)


# --- ReasonVOS ----------------------------------------------------------------------------------------


def test_reasonvos_reader_matches_revos(synthetic_reasonvos, synthetic_revos, s3_server, s3_bucket):
    remote = join_uri(s3_bucket, "ReasonVOS")
    store_for(remote, s3_server).upload_tree(synthetic_reasonvos, remote)
    revos_exprs = {}
    for split in ("train", "valid"):
        ds = open_dataset("revos", str(synthetic_revos), split)
        revos_exprs.update({(e.video.split("/")[-1], e.expression): (ds, e) for e in ds.expressions()})
    for rv in (
        open_dataset("reasonvos", str(synthetic_reasonvos)),
        open_dataset("reasonvos", remote, None, s3_server),
    ):
        exprs = list(rv.expressions())
        assert len(rv.video_names) == 6 and exprs
        assert {e.is_sent for e in exprs} == {True, False} and all(e.type_id is None for e in exprs)
        for e in exprs[:: max(1, len(exprs) // 8)]:
            ds, twin = revos_exprs[(e.video, e.expression)]
            assert e.is_sent == (twin.type_id == 1)
            assert np.array_equal(rv.gt_masks(e), ds.gt_masks(twin))
            assert np.array_equal(rv.read_frame(e.video, 4), ds.read_frame(twin.video, 4))


# --- hand-written files: null masks, missing files, malformed fields -------------------------------------

H, W = 6, 8


def _write_image(path: Path, value: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((H, W, 3), value, np.uint8))


def _tiny_revos(root: Path, meta: dict | None = None, masks: dict | None = None) -> Path:
    """One video "v" of 3 frames; object 0 (anno 10) present on frames 0 and 2 (null on 1); a no-target
    expression in the released style with empty obj_id/anno_id lists."""
    box = np.zeros((H, W), bool)
    box[1:4, 2:6] = True
    meta = meta or {
        "videos": {
            "v": {
                "vid_id": 0,
                "height": H,
                "width": W,
                "frames": ["00000", "00001", "00002"],
                "expressions": {
                    "0": {"exp": "the box", "obj_id": [0], "anno_id": [10], "type_id": 0},
                    "1": {"exp": "the ghost", "obj_id": [], "anno_id": [], "type_id": 2},
                },
            }
        }
    }
    masks = masks or {"10": [encode_mask(box), None, _uncompressed(box)]}
    root.mkdir(parents=True, exist_ok=True)
    (root / "meta_expressions_train_.json").write_text(json.dumps(meta))
    (root / "mask_dict.json").write_text(json.dumps(masks))
    for f in ("00000", "00001", "00002"):
        _write_image(root / "JPEGImages" / "v" / f"{f}.jpg")
    return root


def test_null_masks_and_empty_targets(tmp_path):
    ds = open_dataset("revos", str(_tiny_revos(tmp_path / "r")))
    box, ghost = ds.expressions_of("v")
    gt = ds.gt_masks(box)
    assert gt[0].sum() == 12 and not gt[1].any() and np.array_equal(gt[0], gt[2])
    assert not ds.gt_masks(ghost).any() and ds.object_masks(ghost).shape == (0, 3, H, W)
    assert not ghost.is_multi_instance
    assert np.array_equal(ds.foreground("v"), gt)  # no foreground file: union of the objects


def test_missing_frame_names_the_file(tmp_path):
    root = _tiny_revos(tmp_path / "r")
    (root / "JPEGImages" / "v" / "00001.jpg").unlink()
    ds = open_dataset("revos", str(root))
    with pytest.raises(FileNotFoundError, match=r"JPEGImages/v/00001\.jpg"):
        ds.read_frame("v", 1)


def _meta_with(**exp_fields) -> dict:
    exp = {"exp": "the box", "obj_id": [0], "anno_id": [10], "type_id": 0, **exp_fields}
    exp = {k: v for k, v in exp.items() if v is not _DROP}
    return {"videos": {"abc": {"height": H, "width": W, "frames": ["00000"], "expressions": {"3": exp}}}}


_DROP = object()


@pytest.mark.parametrize(
    "meta, message",
    [
        (_meta_with(obj_id="0"), "videos['abc'].expressions['3'].obj_id: expected list of int, got str"),
        (_meta_with(exp=_DROP), "videos['abc'].expressions['3'].exp: missing"),
        (_meta_with(type_id=7), "videos['abc'].expressions['3'].type_id: expected 0, 1 or 2, got 7"),
        (_meta_with(type_id=_DROP), "videos['abc'].expressions['3'].type_id: missing"),
        (
            _meta_with(anno_id=[10, 11]),
            "videos['abc'].expressions['3'].anno_id: expected one anno_id per obj_id",
        ),
        (
            _meta_with(anno_id=[1.5]),
            "videos['abc'].expressions['3'].anno_id: expected list of int or str, got list",
        ),
        (
            {"videos": {"abc": {"frames": "00000", "expressions": {}}}},
            "videos['abc'].frames: expected list of str",
        ),
        (
            {"videos": {"abc": {"frames": [], "height": "6", "expressions": {}}}},
            "videos['abc'].height: expected int",
        ),
        ({"videos": []}, "videos: expected object, got list"),
        ({"video": {}}, "videos: missing"),
    ],
)
def test_malformed_meta_names_file_and_field(tmp_path, meta, message):
    root = _tiny_revos(tmp_path / "r", meta=meta)
    with pytest.raises(DatasetFormatError) as info:
        open_dataset("revos", str(root))
    assert f"meta_expressions_train_.json: {message}" in str(info.value)


def test_malformed_mask_dict_names_file_and_key(tmp_path):
    bad_size = encode_mask(np.ones((H + 1, W), bool))
    cases = [
        (
            {"10": [None, None]},
            "mask_dict.json: ['10']: expected a list of 3 RLE or null (one per frame of video 'v'), got list of 2",
        ),
        (
            {"10": [None, {"size": [H, W], "counts": 3}, None]},
            "mask_dict.json: ['10'][1].counts: expected str, bytes or list of int",
        ),
        ({"10": [None, None, bad_size]}, f"mask_dict.json: ['10'][2].size: expected [{H}, {W}]"),
        ({"11": []}, "mask_dict.json: ['10']: missing"),
    ]
    for masks, message in cases:
        ds = open_dataset("revos", str(_tiny_revos(tmp_path / str(len(message)), masks=masks)))
        with pytest.raises(DatasetFormatError) as info:
            ds.gt_masks(ds.expressions_of("v")[0])
        assert message in str(info.value)
    root = _tiny_revos(tmp_path / "json")
    (root / "meta_expressions_train_.json").write_text("{not json")
    with pytest.raises(DatasetFormatError, match="meta_expressions_train_.json: not valid JSON"):
        open_dataset("revos", str(root))


def _tiny_reasonvos(root: Path, expressions, video_fields: dict | None = None) -> Path:
    meta = {"videos": {"v": {"source": "MeViS", "expressions": expressions, **(video_fields or {})}}}
    root.mkdir(parents=True, exist_ok=True)
    (root / "meta_expressions.json").write_text(json.dumps(meta))
    for f in ("00000", "00001", "00002"):
        _write_image(root / "JPEGImages" / "v" / f"{f}.jpg")
    mask = np.zeros((H, W), np.uint8)
    mask[2:5, 1:4] = 255
    for f in ("00000", "00002"):  # frame 00001 has no PNG: the object is absent there
        path = root / "Annotations" / "mevis_v_4" / f"{f}.png"  # folder name with the source lower-cased
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), mask)
    return root


def test_reasonvos_missing_png_and_variants(tmp_path):
    exps = [{"obj_id": 4, "exp_id": 0, "exp_text": "the object", "is_sent": False}]
    ds = open_dataset("reasonvos", str(_tiny_reasonvos(tmp_path / "a", exps)))
    (e,) = ds.expressions()
    assert (e.obj_ids, e.exp_id, e.is_sent) == ((4,), "0", False)
    assert ds.video("v").frame_names == ("00000", "00001", "00002")  # listed from JPEGImages/v/
    gt = ds.gt_masks(e)
    assert gt[0].sum() == 9 and not gt[1].any() and np.array_equal(gt[0], gt[2])
    # the dict-of-expressions variant, is_sent on the video, obj_id as a string
    variant = {"7": {"obj_id": "4", "exp_text": "the object"}}
    ds = open_dataset("reasonvos", str(_tiny_reasonvos(tmp_path / "b", variant, {"is_sent": True})))
    (e,) = ds.expressions()
    assert (e.exp_id, e.obj_ids, e.is_sent) == ("7", (4,), True)
    assert np.array_equal(ds.gt_masks(e), gt)
    # an object without an annotation folder
    exps = [{"obj_id": 5, "exp_id": 0, "exp_text": "the other", "is_sent": False}]
    ds = open_dataset("reasonvos", str(_tiny_reasonvos(tmp_path / "c", exps)))
    with pytest.raises(FileNotFoundError, match=r"Annotations/MeViS_v_5: no annotation folder"):
        ds.gt_masks(next(ds.expressions()))


@pytest.mark.parametrize(
    "expressions, video_fields, message",
    [
        (5, None, "videos['v'].expressions: expected list of expressions, got int"),
        ({"7": 3}, None, "videos['v'].expressions['7']: expected object, got int"),
        (
            [{"obj_id": 1.5, "exp_text": "x"}],
            None,
            "videos['v'].expressions[0].obj_id: expected int, numeric str or list of int",
        ),
        ([{"obj_id": 1}], None, "videos['v'].expressions[0].exp_text: missing"),
        (
            [{"obj_id": 1, "exp_text": "x", "is_sent": "yes"}],
            None,
            "videos['v'].expressions[0].is_sent: expected bool, got str",
        ),
        ([{"obj_id": 1, "exp_text": "x"}], {"source": 3}, "videos['v'].source: expected str, got int"),
    ],
)
def test_reasonvos_malformed(tmp_path, expressions, video_fields, message):
    root = _tiny_reasonvos(tmp_path / "r", expressions, video_fields)
    with pytest.raises(DatasetFormatError) as info:
        open_dataset("reasonvos", str(root))
    assert f"meta_expressions.json: {message}" in str(info.value)
