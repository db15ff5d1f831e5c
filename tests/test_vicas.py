"""ViCaS (issue 28): the synthetic world in the ViCaS layout, the reader (local and through an S3-compatible server,
bad entries left out and counted), ViCaS's LG-VIS track mAP on hand-worked cases, and `veason eval` on val and
test with ground-truth answers."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_evaluate import GT_RUN

from veason_ray.config_loading import load_config
from veason_ray.datasets import DatasetFormatError, RLEFormatError, decode_rle, encode_mask, open_dataset
from veason_ray.object_store import join_uri, store_for
from veason_ray.synth.expressions import NO_TARGET
from veason_ray.synth.world import WorldConfig
from veason_ray.synth.writer import simulate_video, write_synthetic_dataset
from veason_ray.vicas_scoring import IOU_THRESHOLDS, average_precision, track_ious, track_map

SPEC = {"seed": 7, "num_videos": 8, "num_frames": 12, "height": 120, "width": 160}
HUMAN_FRAMES = (0, 3, 6, 9)  # every third frame of 12 is "human-annotated" in the synthetic layout


@pytest.fixture(scope="module")
def synthetic_vicas(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 scenes in the ViCaS layout: 4 train, 2 val, 2 test."""
    root = tmp_path_factory.mktemp("synthetic_vicas")
    write_synthetic_dataset(root, layout="vicas", valid_fraction=0.5, **SPEC)
    return root


def _world() -> WorldConfig:
    return WorldConfig(height=SPEC["height"], width=SPEC["width"], num_frames=SPEC["num_frames"])


def _splits(root: Path) -> dict[str, list[int]]:
    return {
        s: json.loads((root / "splits" / "v1.0" / f"{s}.json").read_text()) for s in ("train", "val", "test")
    }


def _annotation(root: Path, video_id: int) -> Path:
    return root / "annotations" / "v1.0" / f"{video_id:06d}.json"


# --- the layout -----------------------------------------------------------------------------------------


def test_layout_is_exact(synthetic_vicas):
    splits = _splits(synthetic_vicas)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [4, 2, 2]
    assert sorted(sum(splits.values(), [])) == list(range(SPEC["num_videos"]))
    for video_id in range(SPEC["num_videos"]):
        doc = json.loads(_annotation(synthetic_vicas, video_id).read_text())
        scene, exprs = simulate_video(SPEC["seed"], video_id, _world())
        assert doc["video_id"] == video_id and doc["image_size"] == [SPEC["height"], SPEC["width"]]
        assert doc["all_track_ids"] == list(range(1, len(scene.objects) + 1))
        frames = sorted(p.name for p in (synthetic_vicas / "video_frames" / f"{video_id:06d}").iterdir())
        assert [s["filename"] for s in doc["segmentations"]] == frames == [f"{t:05d}.jpg" for t in range(12)]
        for t, entry in enumerate(doc["segmentations"]):
            assert entry["is_gt"] == (t in HUMAN_FRAMES)
            visible = [i + 1 for i in range(len(scene.objects)) if scene.modal[i, t].any()]
            assert entry["track_ids"] == visible
            for track, rle in zip(entry["track_ids"], entry["mask_rles"], strict=True):
                assert np.array_equal(decode_rle(rle), scene.modal[track - 1, t])
        targets = [e for e in exprs if e.type_id != NO_TARGET]  # ViCaS has no prompt without an object
        assert doc["object_referrals"] == [
            {"prompt": e.text, "track_ids": [i + 1 for i in e.targets]} for e in targets
        ]


def test_same_seed_same_bytes(tmp_path):
    args = {"layout": "vicas", "num_videos": 3, "num_frames": 6, "height": 96, "width": 128}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        write_synthetic_dataset(tmp_path / name, seed=seed, **args)
    files = {
        name: {
            p.relative_to(tmp_path / name).as_posix(): p.read_bytes()
            for p in (tmp_path / name).rglob("*")
            if p.is_file()
        }
        for name in "abc"
    }
    assert files["a"] == files["b"] != files["c"]


def test_cli_writes_the_vicas_layout(tmp_path, capsys):
    import argparse

    from veason_ray.synth import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    out = tmp_path / "cli"
    args = [
        "--out",
        str(out),
        "--layout",
        "vicas",
        "--videos",
        "4",
        "--frames",
        "4",
        "--valid-fraction",
        "0.5",
    ]
    assert cli.run(parser.parse_args([*args, "--height", "96", "--width", "128"])) == 0
    assert "train 2, val 1, test 1" in capsys.readouterr().out
    assert len(open_dataset("vicas", str(out), "test")) > 0


# --- the reader -----------------------------------------------------------------------------------------


def _check_reader(root: str, storage=None) -> None:
    splits = _splits(Path(root)) if storage is None else None
    for split in ("train", "val", "test"):
        ds = open_dataset("vicas", root, split, storage)
        assert ds.version == "v1.0" and ds.skipped == []
        if splits is not None:
            assert ds.video_names == [f"{v:06d}" for v in splits[split]]
        for name in ds.video_names:
            scene, exprs = simulate_video(SPEC["seed"], int(name), _world())
            targets = [e for e in exprs if e.type_id != NO_TARGET]
            records = ds.expressions_of(name)
            assert [(r.exp_id, r.expression, r.type_id) for r in records] == [
                (str(k), e.text, None) for k, e in enumerate(targets)
            ]
            info = ds.video(name)
            assert (info.num_frames, info.height, info.width) == (12, 120, 160)
            assert info.frame_uris[3].endswith(f"video_frames/{name}/00003.jpg")
            assert ds.read_frame(name, 3).shape == (120, 160, 3)
            assert ds.benchmark_frames(name) == HUMAN_FRAMES
            for record, e in list(zip(records, targets, strict=True))[:3]:
                assert record.obj_ids == tuple(i + 1 for i in e.targets) and record.anno_ids == tuple(
                    str(i + 1) for i in e.targets
                )
                assert np.array_equal(ds.object_masks(record), scene.modal[list(e.targets)])
                assert np.array_equal(
                    ds.gt_masks(record, [9, 0]), scene.modal[list(e.targets)][:, [9, 0]].any(0)
                )


def test_reader_local_and_through_s3(synthetic_vicas, s3_server, s3_bucket):
    remote_root = join_uri(s3_bucket, "ViCaS")
    store_for(remote_root, s3_server).upload_tree(synthetic_vicas, remote_root)
    for root, storage in ((str(synthetic_vicas), None), (remote_root, s3_server)):
        _check_reader(root, storage)
    local, remote = (
        open_dataset("vicas", str(synthetic_vicas)),
        open_dataset("vicas", remote_root, None, s3_server),
    )
    assert remote.split == "val" and list(remote.expressions()) == list(local.expressions())
    record = next(remote.expressions())
    assert np.array_equal(remote.gt_masks(record), local.gt_masks(record))
    assert np.array_equal(remote.read_frames(record.video, [0, 11]), local.read_frames(record.video, [0, 11]))


def test_split_names_and_pickling(synthetic_vicas):
    val = open_dataset("vicas", str(synthetic_vicas), "val")
    for alias in ("valid", "v1.0/val"):  # data.eval_split's default; a release version named
        assert open_dataset("vicas", str(synthetic_vicas), alias).video_names == val.video_names
    record = next(val.expressions())
    gt = val.gt_masks(record)
    clone = pickle.loads(pickle.dumps(val))
    assert val._tracks and clone._tracks is None  # the parsed masks stay behind; the clone reads them again
    assert np.array_equal(clone.gt_masks(record), gt) and clone.benchmark_frames(record.video) == HUMAN_FRAMES


def test_an_older_release_beside_the_newest(synthetic_vicas, tmp_path):
    """Without a version the newest is read; `v0.1/val` names the older one, whose files may carry the video's
    name after its id (`<video_id:06d>_<name>.json`, as the official evaluation still accepts)."""
    root = tmp_path / "vicas"
    shutil.copytree(synthetic_vicas, root)
    video_id = _splits(root)["train"][0]
    (root / "splits" / "v0.1").mkdir()
    (root / "splits" / "v0.1" / "val.json").write_text(json.dumps([video_id]))
    (root / "annotations" / "v0.1").mkdir()
    shutil.copy(
        _annotation(root, video_id), root / "annotations" / "v0.1" / f"{video_id:06d}_synth_clip.json"
    )
    newest, older = open_dataset("vicas", str(root), "val"), open_dataset("vicas", str(root), "v0.1/val")
    assert newest.version == "v1.0" and newest.video_names == [f"{v:06d}" for v in _splits(root)["val"]]
    assert older.version == "v0.1" and older.video_names == [f"{video_id:06d}"] and len(older) > 0


def _edit(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def test_bad_entries_are_skipped_and_counted(synthetic_vicas, tmp_path):
    root = tmp_path / "vicas"
    shutil.copytree(synthetic_vicas, root)
    a, b, c, d = _splits(root)["train"]
    kept = len(open_dataset("vicas", str(root), "train").expressions_of(f"{a:06d}"))

    def break_prompts(doc: dict) -> None:
        first = doc["segmentations"][0]
        first["track_ids"].append(50)  # a track whose RLE has the wrong size
        first["mask_rles"].append(encode_mask(np.zeros((4, 4), bool)))
        doc["object_referrals"] += [
            {"prompt": "nothing at all", "track_ids": []},
            {"prompt": "the ghost", "track_ids": [99]},
            {"prompt": 5, "track_ids": [1]},
            {"prompt": "the broken one", "track_ids": [50]},
        ]

    _edit(_annotation(root, a), break_prompts)
    shutil.rmtree(root / "video_frames" / f"{b:06d}")
    _annotation(root, c).unlink()
    _annotation(root, d).write_text('{"video_id": ')
    ds = open_dataset("vicas", str(root), "train")
    assert ds.video_names == [f"{a:06d}"] and len(ds) == kept
    assert ds.skipped_counts == {
        "invalid_rle": 1,
        "malformed_annotation": 2,
        "missing_annotation": 1,
        "missing_video": 1,
        "no_objects": 1,
        "unknown_track": 1,
    }
    details = {(s.reason, s.exp_id): s.detail for s in ds.skipped}
    file_a, n = str(_annotation(root, a)), kept
    assert details["no_objects", str(n)] == (
        f"{file_a}: object_referrals[{n}].track_ids: empty (the prompt 'nothing at all' refers to no object)"
    )
    assert details["unknown_track", str(n + 1)].endswith("track(s) [99] have no mask on any frame")
    assert (
        details["malformed_annotation", str(n + 2)]
        == f"{file_a}: object_referrals[{n + 2}].prompt: expected str, got int"
    )
    j = json.loads(_annotation(root, a).read_text())["segmentations"][0]["track_ids"].index(50)
    assert details["invalid_rle", str(n + 3)] == (
        f"{file_a}: segmentations[0].mask_rles[{j}].size: expected [120, 160] (the file's image_size), got [4, 4]"
    )
    assert details["missing_video", None].startswith(f"{root}/video_frames/{b:06d}/00000.jpg: not found")
    assert details["missing_annotation", None].endswith(f"video {c} has no annotations/v1.0/{c:06d}.json")
    assert details["malformed_annotation", None].startswith(f"{_annotation(root, d)}: not valid JSON")


def test_a_corrupt_rle_string_names_its_place_when_decoded(synthetic_vicas, tmp_path):
    root = tmp_path / "vicas"
    shutil.copytree(synthetic_vicas, root)
    video_id = _splits(root)["val"][0]
    record = open_dataset("vicas", str(root), "val").expressions_of(f"{video_id:06d}")[0]
    track = record.obj_ids[0]
    doc = json.loads(_annotation(root, video_id).read_text())
    k = next(k for k, s in enumerate(doc["segmentations"]) if track in s["track_ids"])
    j = doc["segmentations"][k]["track_ids"].index(track)
    doc["segmentations"][k]["mask_rles"][j]["counts"] = "~~~~"
    _annotation(root, video_id).write_text(json.dumps(doc))
    ds = open_dataset("vicas", str(root), "val")  # the form is right: the prompt is kept
    assert ds.skipped == [] and record in ds.expressions_of(record.video)
    with pytest.raises(
        RLEFormatError, match=rf"{video_id:06d}\.json: segmentations\[{k}\]\.mask_rles\[{j}\]\.counts"
    ):
        ds.gt_masks(record)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda root: shutil.rmtree(root / "splits"),
            r"splits: no <version>/val\.json for split 'val'; copy",
        ),
        (
            lambda root: (root / "splits" / "v1.0" / "val.json").write_text('{"ids": [1]}'),
            r"val\.json: \(root\): expected a list of int video ids, got dict",
        ),
        (lambda root: shutil.rmtree(root / "annotations"), r"annotations/v1\.0: no annotation files"),
        (
            lambda root: [shutil.rmtree(p) for p in (root / "video_frames").iterdir()],
            r"val\.json: none of its 2 videos has a usable LG-VIS prompt \(left out: \{'missing_video': 2\}\)",
        ),
    ],
)
def test_an_unusable_split_names_the_file_and_the_fix(synthetic_vicas, tmp_path, change, message):
    root = tmp_path / "vicas"
    shutil.copytree(synthetic_vicas, root)
    change(root)
    with pytest.raises(DatasetFormatError, match=message):
        open_dataset("vicas", str(root), "val")


# --- ViCaS's track mAP --------------------------------------------------------------------------------------


def _padded_ap(hits: list[bool], num_gt: int) -> float:
    """AP written the long way (the release's formula): precision and recall padded with 0 at the start and
    (0, 1) at the end, the precision made non-increasing from the right, summed over the recall steps."""
    tp = np.cumsum(hits)
    precision = np.concatenate([[0.0], tp / np.arange(1, len(hits) + 1), [0.0]])
    recall = np.concatenate([[0.0], tp / num_gt, [1.0]])
    for i in range(len(precision) - 2, -1, -1):
        precision[i] = max(precision[i], precision[i + 1])
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def test_average_precision_by_hand_and_against_the_padded_formula():
    assert average_precision([True, False, True], 4) == pytest.approx((1 + 2 / 3) / 4)
    assert average_precision([False, True], 1) == pytest.approx(0.5)
    assert average_precision([], 3) == 0.0 and average_precision([False], 0) == 1.0
    rng = np.random.default_rng(0)
    for _ in range(200):
        hits = (rng.random(rng.integers(1, 30)) < rng.random()).tolist()
        num_gt = int(sum(hits) + rng.integers(0, 5)) or 1
        assert average_precision(hits, num_gt) == pytest.approx(_padded_ap(hits, num_gt))


def test_track_ious_and_map_by_hand():
    gt = np.zeros((2, 2, 4, 4), bool)
    gt[0, 0, :2, :2] = True  # track 1: 4 px on frame 0
    gt[1, 1, :, :] = True  # track 2: 16 px on frame 1
    predicted = np.zeros((2, 4, 4), bool)
    predicted[0, :2, :] = True  # 8 px on frame 0 (covers track 1)
    assert track_ious(predicted, gt) == [pytest.approx(4 / 8), 0.0]
    assert track_ious(np.zeros((2, 4, 4), bool), np.zeros((1, 2, 4, 4), bool)) == [0.0]
    entries = [
        {"track_ious": [0.95], "submitted": True},
        {"track_ious": [0.6, 0.1], "submitted": True},
        {"track_ious": [0.0], "submitted": False},  # an empty track: not submitted, its ground truth missed
    ]
    score = track_map(entries)
    # 4 ground-truth tracks; at 0.50-0.60 both submitted tracks hit (AP 2/4), above 0.60 the first only (1/4)
    assert len(IOU_THRESHOLDS) == 10 and score["ap50"] == 0.5 and score["ap75"] == score["ap90"] == 0.25
    assert score["map"] == pytest.approx((3 * 0.5 + 7 * 0.25) / 10)
    assert (score["prompts"], score["gt_tracks"], score["submitted_tracks"]) == (3, 4, 2)


# --- veason eval ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    # the test split through the whole job is slow-marked (the default suite's budget); its reader is tested above
    "split",
    ["val", pytest.param("test", marks=pytest.mark.slow)],
)
def test_ground_truth_answers_through_veason_eval(split, local_ray, synthetic_vicas, tmp_path):
    """Ground-truth answers reach the J&F bound of the other layouts (tests/test_evaluate.py); ViCaS's track mAP
    is reported beside it; a prompt with no object (in val) is left out and reported."""
    from pipelines.evaluate import format_report, run_evaluation

    root = tmp_path / "vicas"
    shutil.copytree(synthetic_vicas, root)
    _edit(
        _annotation(root, _splits(root)["val"][0]),
        lambda doc: doc["object_referrals"].append({"prompt": "nobody", "track_ids": []}),
    )
    out = tmp_path / "eval"
    cfg = load_config(
        "tests/configs/small.yaml",
        ["data.dataset=vicas", f"data.root={root}", f"eval.split={split}", f"eval.output_dir={out}", *GT_RUN],
    )
    report = run_evaluation(cfg)
    summary, dataset = report.summary, open_dataset("vicas", str(root), split)
    assert summary["expressions"] == len(dataset) > 0 and summary["failed"] == 0
    assert (summary["benchmark"], summary["split"], list(summary["subsets"])) == ("vicas", split, ["all"])
    assert summary["subsets"]["all"]["jf"] >= 0.90, summary["subsets"]
    assert summary["parse_rate"] == 1.0
    assert summary["left_out"] == ({"no_objects": 1} if split == "val" else {})
    lgvis = summary["lgvis"]
    assert lgvis["prompts"] == len(dataset) == lgvis["submitted_tracks"]
    assert lgvis["gt_tracks"] == sum(len(r.obj_ids) for r in dataset.expressions())
    entries = {r.key: r.extra["lgvis"] for r in report.results}
    assert lgvis == track_map([entries[r.key] for r in dataset.expressions()])  # ranked in benchmark order
    for (
        record
    ) in dataset.expressions():  # one IoU per ground-truth track; one object: the answer's track is it
        ious = entries[record.key]["track_ious"]
        assert len(ious) == len(record.obj_ids) and (record.is_multi_instance or ious[0] >= 0.7)
    text = (out / "summary.md").read_text()
    assert text.startswith(f"# vicas {split}") and "LG-VIS track mAP (ViCaS's score" in text
    assert ("Left out when the split was read" in text) == (split == "val")
    assert "LG-VIS track mAP" in format_report(report)
