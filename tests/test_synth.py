"""The synthetic world: determinism, exact layouts, and expressions that are true of the pixels."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from veason_ray.datasets import decode_rle, open_dataset
from veason_ray.object_store import join_uri
from veason_ray.synth import cli
from veason_ray.synth.expressions import SynthExpression
from veason_ray.synth.world import COLOURS, SHAPES, SIZES, Scene, WorldConfig
from veason_ray.synth.writer import simulate_video, write_synthetic_dataset


def _world(spec: dict) -> WorldConfig:
    return WorldConfig(height=spec["height"], width=spec["width"], num_frames=spec["num_frames"])


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- determinism --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["revos", "reasonvos"])
def test_same_seed_same_bytes(tmp_path, layout):
    args = {"layout": layout, "num_videos": 3, "num_frames": 6, "height": 96, "width": 128}
    write_synthetic_dataset(tmp_path / "a", seed=3, **args)
    write_synthetic_dataset(tmp_path / "b", seed=3, **args)
    write_synthetic_dataset(tmp_path / "c", seed=4, **args)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    assert a != c


def test_more_videos_leave_earlier_ones_unchanged(tmp_path):
    args = {"num_frames": 6, "height": 96, "width": 128, "seed": 5, "valid_fraction": 0.0}
    write_synthetic_dataset(tmp_path / "three", num_videos=3, **args)
    write_synthetic_dataset(tmp_path / "four", num_videos=4, **args)
    three, four = _files(tmp_path / "three"), _files(tmp_path / "four")
    assert all(four[k] == v for k, v in three.items() if k.startswith("JPEGImages/"))
    meta3 = json.loads(three["meta_expressions_train_.json"])["videos"]
    meta4 = json.loads(four["meta_expressions_train_.json"])["videos"]
    assert all(meta4[k]["expressions"] == v["expressions"] for k, v in meta3.items())


# --- layouts ------------------------------------------------------------------------------------------


def test_revos_layout_is_exact(synthetic_revos, synthetic_spec):
    root, cfg = synthetic_revos, _world(synthetic_spec)
    masks = json.loads((root / "mask_dict.json").read_text())
    fg = json.loads((root / "mask_dict_foreground.json").read_text())
    T, H, W = cfg.num_frames, cfg.height, cfg.width
    seen_videos = []
    for split in ("train", "valid"):
        videos = json.loads((root / f"meta_expressions_{split}_.json").read_text())["videos"]
        for name, video in videos.items():
            seen_videos.append(name)
            assert list(video) == ["vid_id", "height", "width", "frames", "expressions"]
            assert (video["height"], video["width"]) == (H, W)
            assert video["frames"] == [f"{t:05d}" for t in range(T)]
            image = cv2.imread(str(root / "JPEGImages" / name / "00000.jpg"))
            assert image.shape == (H, W, 3)
            assert len(list((root / "JPEGImages" / name).iterdir())) == T
            assert len(fg[name]["masks_rle"]) == T
            real_ids = set()
            for exp_id, exp in video["expressions"].items():
                assert exp_id.isdigit() and list(exp) == ["exp", "obj_id", "anno_id", "type_id"]
                assert exp["type_id"] in (0, 1, 2) and isinstance(exp["exp"], str)
                assert all(isinstance(v, int) for v in exp["obj_id"] + exp["anno_id"])
                assert len(exp["obj_id"]) == len(exp["anno_id"]) >= 1
                for anno in exp["anno_id"]:
                    entry = masks[str(anno)]
                    assert len(entry) == T
                    assert all(r is None or r["size"] == [H, W] for r in entry)
                    if exp["type_id"] == 2:
                        assert entry == [None] * T  # the phantom object: absent everywhere
                    else:
                        # a real object: visible on some frames, null (not an empty RLE) where hidden
                        assert any(entry) and all(r is None or decode_rle(r).any() for r in entry)
                if exp["type_id"] != 2:
                    real_ids.update(exp["obj_id"])
            phantoms = {e["obj_id"][0] for e in video["expressions"].values() if e["type_id"] == 2}
            assert len(phantoms) <= 1 and not phantoms & real_ids
    assert (
        sorted(seen_videos) == sorted(fg) == [f"synth/v{i:04d}" for i in range(synthetic_spec["num_videos"])]
    )


def test_reasonvos_layout_is_exact(synthetic_reasonvos, synthetic_spec):
    root = synthetic_reasonvos
    videos = json.loads((root / "meta_expressions.json").read_text())["videos"]
    assert sorted(videos) == [f"v{i:04d}" for i in range(synthetic_spec["num_videos"])]
    for name, video in videos.items():
        assert video["source"] == "synth" and isinstance(video["expressions"], list)
        for exp in video["expressions"]:
            assert list(exp) == ["obj_id", "exp_id", "exp_text", "is_sent"]
            folder = root / "Annotations" / f"synth_{name}_{exp['obj_id']}"
            pngs = sorted(folder.iterdir())
            assert [p.stem for p in pngs] == video["frames"]
            values = np.unique(np.stack([cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in pngs]))
            assert set(values.tolist()) <= {0, 255} and 255 in values


def test_s3_output_reads_back(s3_server, s3_bucket):
    root = join_uri(s3_bucket, "synth")
    summary = write_synthetic_dataset(
        root, num_videos=2, num_frames=4, height=96, width=128, storage=s3_server
    )
    ds = open_dataset("revos", root, "train", s3_server)
    valid = open_dataset("revos", root, "valid", s3_server)
    assert len(ds) + len(valid) == summary.num_expressions
    e = next(ds.expressions())
    assert ds.read_frame(e.video, 0).shape == (96, 128, 3) and ds.gt_masks(e).shape == (4, 96, 128)


def test_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    out = tmp_path / "cli"
    args = parser.parse_args(
        ["--out", str(out), "--videos", "2", "--frames", "5", "--height", "96", "--width", "128"]
    )
    assert cli.run(args) == 0
    text = capsys.readouterr().out
    assert "2 videos" in text and str(out) in text and "referring" in text and "multi-instance" in text
    assert (out / "meta_expressions_train_.json").exists()


# --- the written dataset says what the simulation says, and it is true of the pixels ------------------


def _written(synthetic_revos: Path, spec: dict):
    """(reader, its expression records, scene, generated expressions) per video of the fixture."""
    readers = {s: open_dataset("revos", str(synthetic_revos), s) for s in ("train", "valid")}
    for index in range(spec["num_videos"]):
        name = f"synth/v{index:04d}"
        ds = next(r for r in readers.values() if name in r.video_names)
        scene, generated = simulate_video(spec["seed"], index, _world(spec))
        yield ds, ds.expressions_of(name), scene, generated


def test_records_match_the_simulation(synthetic_revos, synthetic_spec):
    for _, records, scene, generated in _written(synthetic_revos, synthetic_spec):
        assert [r.expression for r in records] == [g.text for g in generated]
        for r, g in zip(records, generated, strict=True):
            assert r.type_id == g.type_id
            assert r.obj_ids == (g.targets if g.targets else (len(scene.objects),))


def _colour_of(pixels: np.ndarray) -> str:
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names], float)
    return names[int(np.argmin(np.linalg.norm(palette - np.median(pixels, axis=0), axis=1)))]


def test_expressions_are_true_of_the_pixels(synthetic_revos, synthetic_spec):
    kernel = np.ones((5, 5), np.uint8)
    checked_colours = 0
    for ds, records, scene, generated in _written(synthetic_revos, synthetic_spec):
        video = records[0].video
        frames = ds.read_frames(video)
        fg = ds.foreground(video)
        for r, g in zip(records, generated, strict=True):
            objs, gt = ds.object_masks(r), ds.gt_masks(r)
            if r.type_id == 2:
                assert not gt.any()
                continue
            assert gt.any()
            words = set(r.expression.replace("?", "").split())
            if g.predicate == "attributes" and words & set(COLOURS):
                (colour,) = words & set(COLOURS)
                for k in range(len(r.obj_ids)):
                    seen = 0
                    for t in range(scene.num_frames):
                        core = cv2.erode(objs[k, t].astype(np.uint8), kernel) > 0
                        if core.sum() >= 3:
                            assert _colour_of(frames[t][core]) == colour, (r.expression, k, t)
                            seen += 1
                    assert seen, f"{r.expression}: target {k} never clearly visible"
                    checked_colours += 1
            if g.predicate == "leaves":
                assert all(objs[k].any() and not objs[k, -1].any() for k in range(len(objs)))
            if g.predicate == "enters":
                assert all(objs[k].any() and not objs[k, 0].any() for k in range(len(objs)))
        # visible masks: disjoint between objects (occlusion), together the foreground
        per_object = scene.modal
        assert (per_object.sum(axis=0) <= 1).all()
        assert np.array_equal(per_object.any(axis=0), fg)
    assert checked_colours > 0


# --- truth of every predicate, checked on the simulated state with independent code --------------------


def _named(scene: Scene, phrase: str) -> list[int]:
    """Objects matching the attribute words of a phrase ("small red star", "green shapes", "circles")."""
    words = [w[:-1] if w.endswith("s") and w[:-1] in (*SHAPES, "shape") else w for w in phrase.split()]
    out = []
    for i, o in enumerate(scene.objects):
        attrs = {o.colour, o.shape, o.size, "shape"}
        if all(w in attrs for w in words if w in COLOURS or w in SHAPES or w in SIZES or w == "shape"):
            out.append(i)
    return out


def _reference(scene: Scene, text: str) -> int:
    (ref,) = _named(scene, text.rsplit(" the ", 1)[1].rstrip("?"))
    return ref


def _contact(scene: Scene) -> np.ndarray:
    n, t = len(scene.objects), scene.num_frames
    padded = np.pad(scene.amodal, ((0, 0), (0, 0), (1, 1), (1, 1)))
    grown = np.zeros_like(scene.amodal)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            grown |= padded[:, :, dy : dy + scene.height, dx : dx + scene.width]
    out = np.zeros((n, n, t), bool)
    for i in range(n):
        for j in range(n):
            if i != j:
                out[i, j] = (grown[i] & scene.amodal[j]).any(axis=(1, 2))
    return out


def _check(scene: Scene, e: SynthExpression) -> None:
    n = len(scene.objects)
    targets, others = set(e.targets), [i for i in range(n) if i not in e.targets]
    in_frame = scene.amodal.any(axis=(2, 3))
    speeds = [o.speed for o in scene.objects]
    p = e.predicate
    if p in ("attributes", "absent_attributes"):
        phrase = (
            e.text.split(" ", 2)[-1] if e.text.startswith(("the two", "the three", "all the")) else e.text[4:]
        )
        assert set(_named(scene, phrase)) == targets
    elif p == "still":
        assert all(speeds[i] == 0 for i in targets) and all(speeds[i] >= 1 for i in others)
    elif p == "leaves":
        assert all(in_frame[i].any() and not in_frame[i, -1] for i in targets)
        assert all(in_frame[i, -1] for i in others)
    elif p == "enters":
        assert all(in_frame[i].any() and not in_frame[i, 0] for i in targets)
        assert all(in_frame[i, 0] for i in others)
    elif p == "fastest":
        (i,) = targets
        assert all(speeds[i] >= 1.5 * speeds[j] for j in others)
    elif p.startswith("moving_"):
        axis, sign = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}[p[len("moving_") :]]
        for i in targets:
            assert (sign * np.diff(scene.objects[i].positions[:, axis]) > 0).all()
    elif p == "collide_first":
        contact = _contact(scene)
        i, j = sorted(targets)
        first = int(np.flatnonzero(contact[i, j])[0])
        assert first > 0 and not contact[:, :, :first].any()
    elif p == "collides_with":
        contact, ref = _contact(scene), _reference(scene, e.text)
        (i,) = targets
        first = int(np.flatnonzero(contact[ref, i])[0])
        assert first > 0 and not contact[ref, :, :first].any()
        assert all(not contact[ref, j, first].any() for j in others if j != ref)
    elif p == "approaches":
        ref = scene.objects[_reference(scene, e.text)].positions
        for i in targets:
            own = scene.objects[i].positions
            before = np.linalg.norm(own[:-1] - ref[:-1], axis=1)
            after_own_step = np.linalg.norm(own[1:] - ref[:-1], axis=1)
            assert (after_own_step < before).all(), e.text
    elif p in ("in_front_of", "behind"):
        ref = _reference(scene, e.text)
        for i in range(n):
            if i == ref:
                continue
            top, bottom = (i, ref) if p == "in_front_of" else (ref, i)
            covers = (
                scene.objects[top].depth > scene.objects[bottom].depth
                and (scene.modal[top] & scene.amodal[bottom]).any()
            )
            assert covers == (i in targets), (e.text, i)
    else:
        raise AssertionError(f"unchecked predicate {p}")


def test_every_predicate_is_true_and_all_kinds_occur():
    cfg = WorldConfig(height=96, width=128, num_frames=10)
    kinds, predicates = set(), set()
    for index in range(40):
        scene, generated = simulate_video(11, index, cfg)
        assert len({g.text for g in generated}) == len(generated)
        assert (scene.visible_area > 0).sum(axis=1).min() >= 2  # every object is seen
        for g in generated:
            _check(scene, g)
            kinds.add((g.type_id, len(g.targets) > 1))
            predicates.add(g.predicate)
    assert kinds == {(0, False), (0, True), (1, False), (1, True), (2, False)}
    assert {
        "attributes",
        "absent_attributes",
        "still",
        "leaves",
        "enters",
        "fastest",
        "collide_first",
    } <= predicates
    assert {"collides_with", "in_front_of", "behind", "approaches"} <= predicates
    assert any(p.startswith("moving_") for p in predicates)


# --- backdrop -----------------------------------------------------------------------------------------


def test_positional_backdrop_gives_the_place_away_and_stays_apart_from_the_shapes():
    """Red rises left to right and green top to bottom, identically in every video (the policy can learn where
    a token lies); blue is the video's tint; every backdrop pixel stays within the colour tracker's background
    distance (60) of the border median and far from every shape colour."""
    from veason_ray.models.colour_propagator import frame_background

    cfg = WorldConfig(height=96, width=128, num_frames=3)
    scenes = [simulate_video(5, index, cfg)[0] for index in range(4)]
    first = scenes[0].background.astype(int)
    assert first.shape == (96, 128, 3)
    assert (np.diff(first[0, :, 0]) >= 0).all() and first[0, -1, 0] - first[0, 0, 0] >= 55
    assert (np.diff(first[:, 0, 1]) >= 0).all() and first[-1, 0, 1] - first[0, 0, 1] >= 55
    for scene in scenes[1:]:
        assert np.array_equal(scene.background[..., :2], scenes[0].background[..., :2])
    assert len({int(s.background[0, 0, 2]) for s in scenes}) > 1  # the tint varies
    for scene in scenes:
        pixels = scene.background.reshape(-1, 3).astype(float)
        assert np.linalg.norm(pixels - frame_background(scene.background), axis=1).max() < 60
        for colour in COLOURS.values():
            assert np.linalg.norm(pixels - np.array(colour), axis=1).min() > 100


def test_vertical_backdrop_is_kept_and_an_unknown_one_is_refused():
    scene, _ = simulate_video(5, 0, WorldConfig(height=96, width=128, num_frames=3, backdrop="vertical"))
    assert (scene.background == scene.background[:, :1]).all()  # constant along each row
    with pytest.raises(ValueError, match="WorldConfig.backdrop"):
        WorldConfig(backdrop="checkerboard")


# --- objects per scene --------------------------------------------------------------------------------


def test_one_object_scenes_have_true_expressions_and_the_cli_writes_them(tmp_path, capsys):
    """A world of single-object scenes (the learning run's curriculum): every scene holds one object, every
    expression is still true of it (no comparison needs a second object), and `veason synth` writes it."""
    cfg = WorldConfig(height=96, width=128, num_frames=10, min_objects=1, max_objects=1)
    predicates = set()
    for index in range(30):
        scene, generated = simulate_video(11, index, cfg)
        assert len(scene.objects) == 1
        assert {g.type_id for g in generated} >= {0}
        for g in generated:
            _check(scene, g)
            assert g.targets in ((), (0,))
            predicates.add(g.predicate)
    assert "fastest" not in predicates and "collide_first" not in predicates
    assert {"attributes", "absent_attributes"} <= predicates

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    out = tmp_path / "one"
    argv = ["--out", str(out), "--videos", "3", "--frames", "5", "--height", "96", "--width", "128"]
    assert cli.run(parser.parse_args([*argv, "--min-objects", "1", "--max-objects", "1"])) == 0
    meta = json.loads((out / "meta_expressions_train_.json").read_text())["videos"]
    for video in meta.values():  # every expression with a target names the video's one object (obj_id 0)
        targets = {o for e in video["expressions"].values() if e["type_id"] != 2 for o in e["obj_id"]}
        assert targets == {0}
    with pytest.raises(ValueError, match="min_objects 3, max_objects 2"):
        WorldConfig(min_objects=3, max_objects=2)
    capsys.readouterr()
