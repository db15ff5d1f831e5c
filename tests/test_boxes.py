"""Box conversions, GT boxes, IoU with the +1 convention, nearest resizing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from veason_ray.boxes import (
    FRAME_SIZE,
    box_iou_matrix,
    boxes_560_to_original,
    boxes_original_to_560,
    clip_boxes_560,
    ground_truth_boxes_560,
    mask_box,
    resize_masks_nearest,
    scale_boxes,
)


def test_560_and_original_round_trip():
    boxes = np.array([[0, 0, 560, 560], [56, 28, 112, 280]])
    original = boxes_560_to_original(boxes, width=1120, height=280)
    assert original.tolist() == [[0, 0, 1120, 280], [112, 14, 224, 140]]
    assert np.allclose(boxes_original_to_560(original, width=1120, height=280), boxes)
    assert scale_boxes([], (10, 10), (20, 20)).shape == (0, 4)


def test_mask_box_is_inclusive_pixel_extent():
    mask = np.zeros((6, 8), dtype=bool)
    mask[1:4, 2:5] = True
    assert mask_box(mask).tolist() == [2, 1, 4, 3]
    assert mask_box(np.zeros((6, 8), dtype=bool)) is None


def test_ground_truth_boxes_scale_add_half_pixel_and_placeholders():
    masks = np.zeros((2, 56, 112), dtype=bool)  # H = 56, W = 112: x * 5, y * 10
    masks[0, 5:16, 10:21] = True
    boxes = ground_truth_boxes_560(masks)
    assert boxes.tolist() == [[50.5, 50.5, 100.5, 150.5], [0, 0, 0, 0]]  # absent object -> zeros
    assert ground_truth_boxes_560(np.zeros((3, 56, 112), dtype=bool)).tolist() == [[0, 0, 0, 0]]
    assert ground_truth_boxes_560(np.zeros((0, 56, 112), dtype=bool)).tolist() == [[0, 0, 0, 0]]


def test_iou_plus_one_convention_hand_worked():
    a, b = [0, 0, 9, 9], [5, 5, 14, 14]  # 10x10 each, 5x5 overlap: 25 / (100 + 100 - 25)
    assert box_iou_matrix([a], [b])[0, 0] == pytest.approx(1 / 7)
    assert box_iou_matrix([a], [a])[0, 0] == 1.0
    assert box_iou_matrix([[0, 0, 0, 0]], [[0, 0, 0, 0]])[0, 0] == 1.0  # placeholder boxes: 1 pixel each
    assert box_iou_matrix([[0, 0, 0, 0]], [[1, 1, 1, 1]])[0, 0] == 0.0
    iou = box_iou_matrix([a, b], [a, b, [100, 100, 109, 109]])
    assert iou.shape == (2, 3) and iou[1, 1] == 1.0 and iou[0, 2] == 0.0


def test_iou_clips_predictions_and_rejects_inverted_boxes():
    assert box_iou_matrix([[-100, -100, 9, 9]], [[0, 0, 9, 9]])[0, 0] == 1.0
    assert box_iou_matrix([[600, 600, 700, 700]], [[550, 550, 559, 559]])[0, 0] == 0.0
    assert box_iou_matrix([[10, 10, 0, 0]], [[0, 0, 10, 10]])[0, 0] == 0.0
    assert box_iou_matrix([[1e300, -1e300, 3, 3]], [[0, 0, 10, 10]])[0, 0] == 0.0
    assert clip_boxes_560([[-5, 3, 600, 561]]).tolist() == [[0, 3, FRAME_SIZE, FRAME_SIZE]]
    assert box_iou_matrix(np.zeros((0, 4)), [[0, 0, 1, 1]]).shape == (0, 1)


def test_resize_masks_nearest_matches_torch_interpolate():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 720, 1280)) < 0.5
    ours = resize_masks_nearest(masks)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(masks).to(torch.uint8)[:, None], size=(560, 560), mode="nearest"
    )[:, 0].bool()
    assert ours.shape == (3, 560, 560) and ours.dtype == bool
    assert np.array_equal(ours, expected.numpy())
    small = np.array([[1, 0], [0, 1]], dtype=np.uint8)
    assert resize_masks_nearest(small, size=4)[0].astype(int).tolist() == [
        [1, 1, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 1, 1],
        [0, 0, 1, 1],
    ]
    assert resize_masks_nearest(masks[:1], size=(10, 20)).shape == (1, 10, 20)


@pytest.mark.parametrize(
    "shape", [(720, 1280), (120, 160), (1080, 1920), (481, 853), (13, 7), (560, 560), (999, 1001)]
)
def test_resize_masks_nearest_equals_torch_at_many_sizes(shape):
    masks = np.random.default_rng(0).random((2, *shape)) > 0.5
    for size in (560, 337):
        expected = torch.nn.functional.interpolate(
            torch.from_numpy(masks).to(torch.uint8)[:, None], size=(size, size), mode="nearest"
        )[:, 0].bool()
        assert np.array_equal(resize_masks_nearest(masks, size), expected.numpy())
        assert np.array_equal(resize_masks_nearest(torch.from_numpy(masks), size), expected.numpy())
