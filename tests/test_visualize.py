"""visualize: the overlay video decodes back with the right frames, size and tint; the sampled-frames strip
has its size and marks the keyframe's tile (and only that one); pictures that leave the program carry their
caption band below the frames; sample pictures of tied responses are one picture, best and worst differ; the
worst overlays cover different videos first."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from prompt_groups import make_group

from pipelines.run_log import save_samples
from veason_ray.eval_overlays import pick_worst
from veason_ray.evaluation import ExpressionResult
from veason_ray.prompts import render_answer
from veason_ray.records import PromptGroup, Rollout, Scored
from veason_ray.reward_scoring import RewardBreakdown
from veason_ray.visualize import (
    BAND_BACKGROUND,
    BOX_COLOUR,
    GT_COLOUR,
    PRED_COLOUR,
    STRIP_TILE_WIDTH,
    Caption,
    caption_band,
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


def _band_video(size: tuple[int, int] = (240, 320)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """6 flat gray frames at the demo's 320x240 with a predicted and a GT block."""
    video, masks = _video(frames=6, height=size[0], width=size[1])
    gt = np.zeros_like(masks)
    gt[:, 55:95, 45:105] = True
    return video, masks, gt


CAPTION = Caption(
    "Which shape moves to the right and then stops near the purple triangle?",
    ((PRED_COLOUR, "predicted mask"), (BOX_COLOUR, "answer: keyframe t=2"), (GT_COLOUR, "ground truth")),
    "J 81.2 | F 85.0 | J&F 83.1",
)


def test_overlay_with_a_caption_band_keeps_the_text_off_the_frames(tmp_path: Path):
    video, masks, gt = _band_video()
    path = write_overlay_video(
        tmp_path / "overlay.mp4",
        video,
        masks,
        keyframe=2,
        boxes=np.array([[40.0, 50.0, 99.0, 89.0]]),
        gt_masks=gt,
        gt_keyframe=4,
        gt_boxes=np.array([[45.0, 55.0, 104.0, 94.0]]),
        band=CAPTION,
        still=tmp_path / "overlay.png",
    )
    decoded = _decode(path)
    still = np.asarray(Image.open(tmp_path / "overlay.png").convert("RGB"))
    assert len(decoded) == len(video) and decoded[0].shape[1] == 320
    assert decoded[0].shape[0] == still.shape[0] > 240 + 60  # the band is below the frames, several lines
    band = still[240:].reshape(-1, 3).astype(int)
    assert (np.abs(band - np.array(BAND_BACKGROUND)).max(axis=1) > 100).mean() > 0.01  # text and swatches
    assert np.abs(still[5:45, 120:300].astype(int) - GRAY).max() < 5  # no text over the frame
    # the still is the answer's keyframe: its yellow border; the GT keyframe of the video has magenta boxes
    assert _is_box_colour(still[:240, 0]).all()

    def magenta(pixels: np.ndarray) -> np.ndarray:  # H.264's halved colour resolution pales a thin line
        red, green, blue = pixels.astype(int).T
        return (red - green > 80) & (blue - green > 60)

    assert magenta(decoded[4][51:54, 60:90].reshape(-1, 3)).any()  # the GT box's top edge, above the box
    assert not magenta(decoded[1][51:54, 60:90].reshape(-1, 3)).any()  # not on other frames


def test_caption_band_wraps_the_question_on_a_narrow_picture():
    narrow, wide = caption_band(CAPTION, 320), caption_band(CAPTION, 1280)
    assert narrow.shape[1] == 320 and wide.shape[1] == 1280
    assert narrow.shape[0] > wide.shape[0]  # the font keeps a legible size: the text wraps instead
    assert (narrow != np.array(BAND_BACKGROUND, dtype=np.uint8)).any(axis=-1).mean() > 0.02


def scored_group(totals: list[float]) -> tuple[PromptGroup, list[Scored]]:
    """A 2-frame group (GT on the second frame) and a parsable response (boxes differing) per reward total."""
    group = make_group(3, num_frames=2)
    group.sample.gt_boxes_560[1][:] = [[20.0, 20.0, 60.0, 60.0]]
    group.sample.gt_masks_560[1, 2:6, 2:6] = True
    scored = []
    for index, total in enumerate(totals):
        text = render_answer("t", 3, [[10.0 * index, 10.0, 50.0, 50.0]])
        reward = RewardBreakdown({"format": 2.0, "keyframe": 1.0, "spatial": total / 4}, total)
        scored.append(Scored(Rollout(group.group_id, index, text, [], [], "stop", 0), reward))
    return group, scored


def test_samples_of_tied_responses_are_one_picture(tmp_path: Path):
    group, scored = scored_group([1.5, 1.5, 1.5])
    assert save_samples(1, [group], {group.group_id: scored}, tmp_path, None) == 1
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "step_000001_group_3_all_tied.png",
        "step_000001_group_3_all_tied.txt",
    ]


def test_best_and_worst_samples_are_different_responses(tmp_path: Path):
    group, scored = scored_group([1.0, 3.0, 2.0])
    assert save_samples(7, [group], {group.group_id: scored}, tmp_path, None) == 2
    folder = tmp_path / "samples"
    best, worst = (folder / "step_000007_group_3_best", folder / "step_000007_group_3_worst")
    assert best.with_suffix(".txt").read_text() == scored[1].rollout.text
    assert worst.with_suffix(".txt").read_text() == scored[0].rollout.text
    best_png, worst_png = (np.asarray(Image.open(p.with_suffix(".png"))) for p in (best, worst))
    assert best_png.shape == worst_png.shape and not np.array_equal(best_png, worst_png)
    assert best_png.shape[0] > 112  # the frames, then the caption band below them


def _result(video: str, exp_id: str, jf: float) -> ExpressionResult:
    return ExpressionResult(video, exp_id, "the square", 0, False, j=jf, f=jf)


def test_worst_overlays_cover_different_videos_first():
    results = [_result("a", "0", 0.1), _result("a", "1", 0.2), _result("a", "2", 0.3), _result("b", "0", 0.5)]
    results += [_result("c", "0", 0.9), ExpressionResult("d", "0", "x", 0, False, error="corrupt_frame: x")]
    results += [ExpressionResult("e", "0", "nothing", 2, False, j=0.0, f=0.0)]  # no target: never drawn
    assert [r.key for r in pick_worst(results, 3)] == ["a/0", "b/0", "c/0"]
    assert [r.key for r in pick_worst(results, 5)] == ["a/0", "b/0", "c/0", "a/1", "a/2"]
    assert pick_worst(results, 0) == []
