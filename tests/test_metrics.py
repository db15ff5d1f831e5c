"""J, F, R and the ReVOS aggregation: hand-worked cases, and equality with the per-frame DAVIS reference of
benchmarks/metrics.py (numpy + OpenCV) on random masks and every degenerate case."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from veason_ray.metrics import (
    ExpressionScore,
    boundary_radius,
    j_and_f_per_frame,
    jaccard_per_frame,
    revos_summary,
    robustness_corrected_per_frame,
    robustness_release_per_frame,
    score_expression,
    subset_mean,
)
from veason_ray.packed_masks import disk_half_widths

_BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "metrics.py"


@pytest.fixture(scope="module")
def reference():
    pytest.importorskip("cv2")
    spec = importlib.util.spec_from_file_location("metrics_benchmark", _BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pixel(y: int, x: int, size: int = 10) -> np.ndarray:
    mask = np.zeros((1, size, size), dtype=bool)
    mask[0, y, x] = True
    return mask


def test_boundary_radius_matches_davis():
    assert boundary_radius(480, 854) == math.ceil(0.008 * math.hypot(480, 854)) == 8
    assert boundary_radius(720, 1280) == 12
    assert boundary_radius(1080, 1920) == 18
    assert boundary_radius(10, 10) == 1
    assert boundary_radius(10, 10, bound_th=3) == 3
    with pytest.raises(ValueError):
        boundary_radius(10, 10, bound_th=2.5)


def test_disk_half_widths():
    assert disk_half_widths(0) == [0]
    assert disk_half_widths(1) == [1, 0]
    assert disk_half_widths(2) == [2, 1, 0]
    assert disk_half_widths(3) == [3, 2, 2, 0]


def test_jaccard_hand_worked():
    gt = np.zeros((3, 4, 4), dtype=bool)
    pred = np.zeros((3, 4, 4), dtype=bool)
    gt[0, 0, :4] = True  # 4 pixels
    pred[0, 0, :2] = True  # 2 of them -> 2 / 4
    pred[1, 1, 1] = True  # gt empty, pred not -> 0
    # frame 2: both empty -> 1
    assert jaccard_per_frame(pred, gt).tolist() == [0.5, 0.0, 1.0]
    j, _ = j_and_f_per_frame(pred, gt)
    assert j.tolist() == [0.5, 0.0, 1.0]


def test_f_hand_worked_single_pixels():
    # A single pixel's boundary (pixels differing from their right / bottom / bottom-right neighbour) is the
    # 2x2 block ending at it. In a 10x10 frame bound_pix = ceil(0.008 * sqrt(200)) = 1: a plus-shaped disk.
    gt = _pixel(4, 4)
    # Pred two columns right: half of each boundary block lies within one pixel of the other -> P = R = 1/2.
    j, f = j_and_f_per_frame(_pixel(4, 6), gt)
    assert j.tolist() == [0.0] and f.tolist() == [0.5]
    # Pred one column right: every boundary pixel is within one pixel of the other boundary -> F = 1.
    assert j_and_f_per_frame(_pixel(4, 5), gt)[1].tolist() == [1.0]
    # Pred diagonal (5, 5): the blocks share pixel (4, 4); of each block only the far corner is more than one
    # step (in the plus) from the other block -> P = R = 3/4.
    assert j_and_f_per_frame(_pixel(5, 5), gt)[1].tolist() == [pytest.approx(0.75)]


def test_f_degenerate_cases():
    empty = np.zeros((1, 10, 10), dtype=bool)
    full = np.ones((1, 10, 10), dtype=bool)
    blob = _pixel(4, 4)
    assert j_and_f_per_frame(empty, empty)[1].tolist() == [1.0]  # both empty: F = 1
    assert j_and_f_per_frame(empty, blob)[1].tolist() == [0.0]  # pred empty: P = 1, R = 0
    assert j_and_f_per_frame(blob, empty)[1].tolist() == [0.0]  # gt empty: P = 0, R = 1
    # A full mask has no boundary (no pixel differs from an existing neighbour): full vs full and, as in
    # DAVIS, full vs empty both count as "both boundaries empty", F = 1, while J tells them apart.
    assert j_and_f_per_frame(full, full) == (torch.tensor([1.0], dtype=torch.float64),) * 2
    j, f = j_and_f_per_frame(full, empty)
    assert j.tolist() == [0.0] and f.tolist() == [1.0]


def _random_masks(rng: np.random.Generator, reference, frames: int, height: int, width: int, kind: str):
    if kind == "noise":
        return rng.random((frames, height, width)) < 0.3
    if min(height, width) < 8:
        return rng.random((frames, height, width)) < 0.5
    return np.stack(
        [reference.random_blobs(rng, height, width, int(rng.integers(0, 4))) for _ in range(frames)]
    )


@pytest.mark.parametrize(
    "height, width",
    [(1, 1), (1, 9), (9, 1), (2, 2), (5, 64), (64, 5), (63, 65), (64, 64), (65, 63), (70, 130), (97, 201)],
)
def test_matches_davis_reference_on_random_masks(reference, height, width):
    rng = np.random.default_rng(height * 1000 + width)
    for kind in ("blobs", "noise"):
        pred = _random_masks(rng, reference, 6, height, width, kind)
        gt = _random_masks(rng, reference, 6, height, width, kind)
        pred[0], gt[0] = False, False
        pred[1] = False
        gt[2] = False
        pred[3], gt[3] = True, True
        gt[4] = True
        for bound_th in (0.008, 1, 3, 0.05):
            j, f = j_and_f_per_frame(pred, gt, bound_th=bound_th)
            ref_j, ref_f = reference.reference_j_and_f(pred, gt, bound_th)
            assert np.abs(j.numpy() - ref_j).max() <= 1e-12
            assert np.abs(f.numpy() - ref_f).max() <= 1e-12


def test_matches_davis_reference_at_480p_and_chunking_changes_nothing(reference):
    rng = np.random.default_rng(7)
    pred, gt = reference.synthetic_video(rng, 5, 480, 854)
    ref_j, ref_f = reference.reference_j_and_f(pred, gt)
    for chunk in (None, 1, 2, 5):
        j, f = j_and_f_per_frame(pred, gt, frames_per_chunk=chunk)
        assert np.abs(j.numpy() - ref_j).max() <= 1e-12
        assert np.abs(f.numpy() - ref_f).max() <= 1e-12


def test_accepts_numpy_uint8_torch_and_negative_strides(reference):
    rng = np.random.default_rng(3)
    pred, gt = reference.synthetic_video(rng, 4, 40, 70)
    expected = j_and_f_per_frame(pred, gt)
    from_uint8 = j_and_f_per_frame(pred.astype(np.uint8) * 255, gt.astype(np.uint8))
    from_torch = j_and_f_per_frame(torch.from_numpy(pred), torch.from_numpy(gt))
    flipped = j_and_f_per_frame(pred[::-1], gt[::-1])
    for result in (from_uint8, from_torch):
        assert torch.equal(result[0], expected[0]) and torch.equal(result[1], expected[1])
    assert torch.equal(flipped[1], expected[1].flip(0))
    with pytest.raises(ValueError):
        j_and_f_per_frame(pred, gt[:, :-1])


def test_flipped_views_that_numpy_calls_contiguous_score_as_their_copies(reference):
    """A negative stride on a length-1 axis (one frame flipped in time, one row flipped upside down) keeps
    numpy's contiguity flag, which once let the view through to torch and raised ValueError."""
    rng = np.random.default_rng(5)
    pred, gt = reference.synthetic_video(rng, 1, 40, 70)
    for view in (pred[::-1], pred[:, :1][:, ::-1], pred[..., ::-1], pred[:, ::-1]):
        truth = gt[:, : view.shape[1]]
        j, f = j_and_f_per_frame(view, truth)
        j_copy, f_copy = j_and_f_per_frame(view.copy(), truth)
        assert torch.equal(j, j_copy) and torch.equal(f, f_copy)
        assert torch.equal(jaccard_per_frame(view, truth), jaccard_per_frame(view.copy(), truth))
    one_frame = pred[::-1]
    assert one_frame.flags.c_contiguous and one_frame.strides[0] < 0  # the case that raised
    score = score_expression(one_frame, gt, foreground=gt)
    assert score.j == score_expression(pred, gt, foreground=gt).j


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu(reference):
    rng = np.random.default_rng(11)
    pred, gt = reference.synthetic_video(rng, 6, 120, 250)
    cpu_j, cpu_f = j_and_f_per_frame(pred, gt)
    cuda_j, cuda_f = j_and_f_per_frame(pred, gt, device="cuda")
    assert torch.equal(cuda_j.cpu(), cpu_j) and torch.equal(cuda_f.cpu(), cpu_f)


def test_robustness_release_emulates_uint8_arithmetic():
    # One false-positive pixel on a 0/255 prediction weighs 255: 1 - 255 / 2 < 0 -> 0.
    gt = np.array([[[1, 0], [0, 0]]], dtype=np.uint8)
    pred = np.array([[[255, 255], [0, 0]]], dtype=np.uint8)
    foreground = np.array([[[1, 1], [0, 0]]], dtype=np.uint8)
    assert robustness_release_per_frame(gt, pred, foreground).tolist() == [0.0]
    assert robustness_corrected_per_frame(gt, pred, foreground).tolist() == [pytest.approx(0.5, abs=1e-6)]
    # Two overlapping GT objects (gt = 2) under pred 255: (1 - 2) wraps to 255, 255 * 255 wraps to 1.
    gt = np.array([[[2, 0], [0, 0]]], dtype=np.uint8)
    pred = np.array([[[255, 0], [0, 0]]], dtype=np.uint8)
    foreground = np.ones((1, 2, 2), dtype=np.uint8)
    assert robustness_release_per_frame(gt, pred, foreground).tolist() == [pytest.approx(0.75, abs=1e-6)]
    assert robustness_corrected_per_frame(gt, pred, foreground).tolist() == [1.0]
    # No foreground and no false positive: 1 - 0 / 1e-6 = 1.
    zeros = np.zeros((1, 2, 2), dtype=np.uint8)
    assert robustness_release_per_frame(zeros, zeros, zeros).tolist() == [1.0]


def test_robustness_release_equals_numpy_on_random_uint8():
    rng = np.random.default_rng(5)
    gt = rng.integers(0, 3, (4, 33, 47)).astype(np.uint8)
    pred = (rng.random((4, 33, 47)) < 0.002).astype(np.uint8) * 255
    foreground = np.full((4, 33, 47), 1, dtype=np.uint8)
    expected = [
        max(1 - ((1 - g) * p).sum() / (f.sum() + 1e-6), 0.0)
        for g, p, f in zip(gt, pred, foreground, strict=True)
    ]
    assert robustness_release_per_frame(gt, pred, foreground).numpy() == pytest.approx(expected, abs=1e-12)


def test_score_expression_and_revos_summary():
    gt = np.zeros((2, 4, 4), dtype=bool)
    gt[:, 0, :2] = True
    pred = gt.copy()
    pred[1, 3, 3] = True  # one false positive on frame 1
    foreground = np.zeros((2, 4, 4), dtype=bool)
    foreground[:, 0, :] = True  # 4 foreground pixels a frame
    score = score_expression(pred, gt, type_id=0, foreground=foreground)
    assert score.j == pytest.approx((1 + 2 / 3) / 2)
    assert score.r_corrected == pytest.approx((1 + 0.75) / 2, abs=1e-6)
    assert score.r_release == pytest.approx(0.5, abs=1e-6)  # frame 1: 1 - 255 / 4 < 0 -> 0

    scores = [
        ExpressionScore(j=0.5, f=0.7, type_id=0),
        ExpressionScore(j=0.3, f=0.5, type_id=0),
        ExpressionScore(j=0.9, f=0.9, type_id=1),
        ExpressionScore(j=0.0, f=0.0, type_id=2),  # no-target probe: excluded from J&F
    ]
    summary = revos_summary(scores)
    assert summary["referring"].j == pytest.approx(0.4) and summary["referring"].jf == pytest.approx(0.5)
    assert summary["reasoning"].jf == pytest.approx(0.9) and summary["reasoning"].count == 1
    assert summary["overall"].jf == pytest.approx(0.7)  # macro: (0.5 + 0.9) / 2, not the mean of 3
    assert summary["overall"].j == pytest.approx(0.65) and summary["overall"].count == 3
    assert subset_mean(scores).jf == pytest.approx((0.6 + 0.4 + 0.9 + 0.0) / 4)
    empty = revos_summary([ExpressionScore(j=1.0, f=1.0, type_id=0)])
    assert math.isnan(empty["reasoning"].jf) and empty["reasoning"].count == 0
    assert empty["overall"].jf == 1.0 and empty["overall"].count == 1  # from what was scored
    assert math.isnan(revos_summary([])["overall"].jf)


def test_a_summary_with_an_empty_subset_prints_a_dash_and_overall_from_what_was_scored():
    from veason_ray.eval_summary import format_summary, summarise_results, summary_markdown
    from veason_ray.evaluation import ExpressionResult

    rewards = {"format": 1.0, "keyframe": 0.0, "spatial": 0.5, "consistency": 0.5, "total": 2.0}
    results = [
        ExpressionResult(f"v{i}", "0", "the cat", 0, False, j=0.5, f=0.7, r_release=1.0, r_corrected=1.0,
                         rewards=rewards)
        for i in range(3)
    ]  # fmt: skip
    summary = summarise_results(
        results, benchmark="revos", split="valid", policy="p", answers="policy", seconds=1.0, evaluated=3
    )
    table = format_summary(summary)
    assert "nan" not in table.lower() and "nan" not in summary_markdown(summary).lower()
    reasoning = next(line for line in table.splitlines() if line.startswith("reasoning"))
    assert reasoning.split()[1:] == ["0", "-", "-", "-", "-", "-"]
    overall = next(line for line in table.splitlines() if line.startswith("overall"))
    assert overall.split()[1:4] == ["3", "50.0", "70.0"]
