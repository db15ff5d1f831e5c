"""visualize: the overlay video decodes back with the right frames, size and tint; the sampled-frames strip
has its size and marks the keyframe's tile (and only that one)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from veason_ray.visualize import (
    BOX_COLOUR,
    STRIP_TILE_WIDTH,
    sampled_frames_strip,
    write_overlay_video,
)

GRAY = 128


def _video(frames: int = 7, height: int = 121, width: int = 161) -> tuple[np.ndarray, np.ndarray]:
    """Flat gray frames (odd sizes) and a mask over a block in the middle of every frame."""
    video = np.full((frames, height, width, 3), GRAY, dtype=np.uint8)
    masks = np.zeros((frames, height, width), dtype=bool)
    masks[:, 50:90, 40:100] = True
    return video, masks


def _decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_overlay_video_plays_back_padded_and_tinted(tmp_path: Path):
    video, masks = _video()
    gt = np.zeros_like(masks)
    gt[:, 45:95, 35:105] = True
    boxes = np.array([[40.0, 50.0, 99.0, 89.0]])
    path = write_overlay_video(
        tmp_path / "deep" / "folder" / "overlay.mp4",
        video,
        masks,
        keyframe=3,
        boxes=boxes,
        caption="the dog that runs towards the camera and then jumps over the fence " * 3,
        gt_masks=gt,
    )
    assert path.is_file() and path.stat().st_size > 0
    decoded = _decode(path)
    assert len(decoded) == len(video)
    assert decoded[0].shape == (122, 162, 3)  # odd sizes padded by one pixel
    inside = decoded[0][60:80, 55:85].reshape(-1, 3).mean(axis=0)
    outside = decoded[0][60:80, 120:150].reshape(-1, 3).mean(axis=0)
    assert inside[0] - inside[1] > 60  # red tint: R well above G under the mask
    assert abs(outside[0] - outside[1]) < 15  # the gray background stays gray
    assert abs(outside.mean() - GRAY) < 15
    keyframe_edge = decoded[3][60, 1].astype(int)  # left border, below the caption strip
    other_edge = decoded[2][60, 1].astype(int)
    assert np.abs(keyframe_edge - np.array(BOX_COLOUR)).max() < 40
    assert np.abs(other_edge - GRAY).max() < 15


def test_overlay_video_rejects_mismatched_masks(tmp_path: Path):
    video, masks = _video()
    with pytest.raises(ValueError, match="masks of shape"):
        write_overlay_video(tmp_path / "x.mp4", video, masks[:, :-1])
    with pytest.raises(ValueError, match="uint8"):
        write_overlay_video(tmp_path / "x.mp4", video.astype(np.float32), masks)


def _sampled(count: int = 4, size: int = 560) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(0)
    frames = rng.integers(20, 200, size=(count, size, size, 3), dtype=np.uint8)
    frames[..., 1] = 20  # no pixel of the frames themselves is yellow
    return frames, [0, 6, 12, 18]


def _is_box_colour(pixels: np.ndarray) -> np.ndarray:
    return np.all(pixels == np.array(BOX_COLOUR, dtype=np.uint8), axis=-1)


def test_strip_shape_border_and_boxes():
    frames, indices = _sampled()
    strip = sampled_frames_strip(
        frames,
        indices,
        keyframe=12,
        boxes_560=np.array([[100.0, 200.0, 400.0, 500.0]]),
        caption="the red car",
    )
    tile = STRIP_TILE_WIDTH  # 560 -> 280: half size
    header = strip.shape[0] - tile
    assert strip.shape[1] == 4 * tile and strip.dtype == np.uint8
    assert 0 < header < 60
    assert strip[:header].max() > 200  # the caption's white text
    row = strip[header:]
    key = row[:, 2 * tile : 3 * tile]
    assert _is_box_colour(key[:, 0]).all() and _is_box_colour(key[:, -1]).all()
    assert _is_box_colour(key[-1]).all()
    # the box [100, 200, 400, 500] in 560 space is [50, 100, 200, 250] on the half-size tile
    assert _is_box_colour(key[250, 50:201]).all() and _is_box_colour(key[100, 50:201]).all()
    assert _is_box_colour(key[175, [50, 200]]).all()
    assert not _is_box_colour(key[175, 60:190]).any() and not _is_box_colour(key[175, 210:270]).any()
    for other in (0, 1, 3):
        assert not _is_box_colour(row[:, other * tile : (other + 1) * tile]).any()


def test_strip_without_keyframe_has_no_border_or_header():
    frames, indices = _sampled(size=200)
    strip = sampled_frames_strip(frames, indices)
    assert strip.shape == (200, 800, 3)  # small frames keep their size, no caption band
    assert not _is_box_colour(strip).any()
    np.testing.assert_array_equal(strip[100:, :200], frames[0][100:])  # below the label: the frame itself


def test_strip_refuses_mismatched_indices():
    frames, _ = _sampled(count=2, size=32)
    with pytest.raises(ValueError, match="3 frame indices for 2 frames"):
        sampled_frames_strip(frames, [0, 1, 2])
