"""mask_io: PNG and RLE round trips of video masks, and the files write_mask_pngs leaves in a folder."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from veason_ray.datasets.rle import decode_rle
from veason_ray.mask_io import mask_png, masks_to_rle, read_mask_png, rle_document, write_mask_pngs
from veason_ray.object_store import store_for


def _video_masks(frames: int = 5, height: int = 23, width: int = 37, seed: int = 0) -> np.ndarray:
    """Random masks (odd sizes on purpose) whose first frame is empty and last frame is full."""
    masks = np.random.default_rng(seed).random((frames, height, width)) < 0.4
    masks[0] = False
    masks[-1] = True
    return masks


def test_png_round_trip_is_exact_and_binary():
    for mask in _video_masks():
        data = mask_png(mask)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        np.testing.assert_array_equal(read_mask_png(data), mask)
        gray = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert gray.ndim == 2 and gray.dtype == np.uint8
        assert set(np.unique(gray).tolist()) <= {0, 255}
    mixed = cv2.imdecode(np.frombuffer(mask_png(_video_masks()[1]), np.uint8), cv2.IMREAD_UNCHANGED)
    assert set(np.unique(mixed).tolist()) == {0, 255}


def test_png_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        mask_png(np.zeros((2, 3, 4), bool))
    with pytest.raises(ValueError, match="empty"):
        read_mask_png(b"")
    with pytest.raises(ValueError, match="not a decodable image"):
        read_mask_png(b"certainly not a png")


def test_write_mask_pngs_names_and_contents(tmp_path: Path):
    masks = _video_masks()
    names = [f"{i:05d}" for i in range(len(masks))]
    folder = str(tmp_path / "Annotations" / "video_1" / "exp_0")
    assert write_mask_pngs(store_for(folder), folder, masks, names) == len(masks)
    assert sorted(p.name for p in Path(folder).iterdir()) == [f"{n}.png" for n in names]
    for mask, name in zip(masks, names, strict=True):
        on_disk = cv2.imread(str(Path(folder) / f"{name}.png"), cv2.IMREAD_GRAYSCALE)
        np.testing.assert_array_equal(on_disk > 127, mask)


def test_write_mask_pngs_refuses_a_name_count_mismatch(tmp_path: Path):
    with pytest.raises(ValueError, match="4 frame names for 5 mask frames"):
        write_mask_pngs(store_for(str(tmp_path)), str(tmp_path), _video_masks(), ["a", "b", "c", "d"])
    assert list(tmp_path.iterdir()) == []


def test_rle_round_trip_is_exact():
    masks = _video_masks(seed=3)
    rles = masks_to_rle(masks)
    assert len(rles) == len(masks)
    for mask, rle in zip(masks, rles, strict=True):
        assert rle["size"] == [23, 37] and isinstance(rle["counts"], str)
        np.testing.assert_array_equal(decode_rle(rle), mask)


def test_rle_document_is_json_and_complete():
    masks = _video_masks(seed=4)
    names = [f"{i:05d}" for i in range(len(masks))]
    doc = rle_document(masks, names, extra={"video": "v1", "expression": 7})
    loaded = json.loads(json.dumps(doc))
    assert loaded["format"] == "coco_rle" and loaded["height"] == 23 and loaded["width"] == 37
    assert loaded["video"] == "v1" and loaded["expression"] == 7
    assert [f["frame"] for f in loaded["frames"]] == names
    assert [f["index"] for f in loaded["frames"]] == list(range(len(masks)))
    assert loaded["frames"][0]["area"] == 0 and loaded["frames"][-1]["area"] == 23 * 37
    for mask, frame in zip(masks, loaded["frames"], strict=True):
        assert frame["area"] == int(mask.sum())
        np.testing.assert_array_equal(decode_rle(frame["rle"]), mask)


def test_rle_document_refuses_mismatches():
    masks = _video_masks()
    with pytest.raises(ValueError, match="2 frame names for 5"):
        rle_document(masks, ["a", "b"])
    with pytest.raises(ValueError, match="'frames'"):
        rle_document(masks, list("abcde"), extra={"frames": []})
    with pytest.raises(ValueError, match=r"\(T, H, W\)"):
        masks_to_rle(masks[0])
