"""Evaluation metrics of docs/method.md section 7: J, F (DAVIS boundary measure), J&F, subset means, ReVOS overall
and robustness R, as batched torch code that runs unchanged on CPU and CUDA.

All frames of a video are processed at once, on bit-packed masks (`packed_masks.py`: 64 pixels a word).

The results equal the DAVIS toolkit's `db_eval_iou` / `db_eval_boundary` (with `_seg2bmap` and
`cv2.dilate(..., skimage.morphology.disk(bound_pix))`) exactly: counts are integers and the final divisions
are done in float64 in the same order as the toolkit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from veason_ray.packed_masks import (
    MaskLike,
    PackedWorkspace,
    as_bool,
    as_tensor,
    cpu_chunk_frames,
    mask_pair,
    pack_masks,
    popcount,
    region_and_boundary_counts,
    rows_below,
    sum_bytes,
)

DEFAULT_BOUND_TH = 0.008


def boundary_radius(height: int, width: int, bound_th: float = DEFAULT_BOUND_TH) -> int:
    """DAVIS bound_pix in pixels: ceil(bound_th * sqrt(H^2 + W^2)) when bound_th < 1, else bound_th itself."""
    if bound_th >= 1:
        if bound_th != int(bound_th):
            raise ValueError(f"a pixel radius must be a whole number, got {bound_th}")
        return int(bound_th)
    return int(math.ceil(bound_th * math.sqrt(height * height + width * width)))


def j_and_f_per_frame(
    pred: MaskLike,
    gt: MaskLike,
    bound_th: float = DEFAULT_BOUND_TH,
    device: torch.device | str | None = None,
    frames_per_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame J (IoU) and F (DAVIS boundary F-measure) of one video, each (T,) float64.

    pred, gt: (T, H, W) masks (bool or any dtype, nonzero = foreground). J is 1 when both masks are empty.
    F: precision = |B_pred & dil(B_gt)| / |B_pred|, recall = |B_gt & dil(B_pred)| / |B_gt| with the DAVIS empty
    cases (only pred empty: P=1, R=0; only gt empty: P=0, R=1; both: P=R=1); F = 2PR/(P+R), 0 when P+R=0.
    device: where to compute (default: the tensors' device, CPU for numpy). frames_per_chunk: frames processed
    per step (default: all on GPU, an L2-sized chunk on CPU); it changes speed, never results.
    """
    pred_t, gt_t = mask_pair(pred, gt, device)
    frames, height, width = pred_t.shape
    radius = boundary_radius(height, width, bound_th)
    chunk = min(frames_per_chunk or cpu_chunk_frames(height, width, pred_t.device) or frames, frames) or 1
    not_last_row = rows_below(height, height - 1, pred_t.device)
    workspace = PackedWorkspace(chunk, height, width, pred_t.device)
    counts = torch.cat(
        [
            region_and_boundary_counts(
                pred_t[i : i + chunk], gt_t[i : i + chunk], radius, not_last_row, workspace
            )
            for i in range(0, frames, chunk)
        ],
        dim=1,
    ).to(torch.float64)
    inter, union, n_pred, n_gt, pred_match, gt_match = counts
    precision = torch.where(n_pred > 0, torch.where(n_gt > 0, pred_match / n_pred, 0.0), 1.0)
    recall = torch.where(n_gt > 0, torch.where(n_pred > 0, gt_match / n_gt, 0.0), 1.0)
    denominator = precision + recall
    f = torch.where(denominator > 0, 2 * precision * recall / denominator, 0.0)
    return torch.where(union > 0, inter / union, 1.0), f


def jaccard_per_frame(pred: MaskLike, gt: MaskLike, device: torch.device | str | None = None) -> torch.Tensor:
    """Per-frame IoU of binary masks, (T,) float64; 1 where both masks are empty."""
    pred_t, gt_t = mask_pair(pred, gt, device)
    t, height, width = pred_t.shape
    workspace = PackedWorkspace(t, height, width, pred_t.device)
    packed = pack_masks(workspace, pred_t, gt_t)
    counted = workspace.counted[: 2 * t]
    torch.bitwise_and(packed[:t], packed[t:], out=counted[:t])
    torch.bitwise_or(packed[:t], packed[t:], out=counted[t:])
    counts = popcount(counted, workspace.scratch[: 2 * t]).to(torch.float64)
    return torch.where(counts[t:] > 0, counts[:t] / counts[t:], 1.0)


def robustness_release_per_frame(gt: MaskLike, pred: MaskLike, foreground: MaskLike) -> torch.Tensor:
    """Release-compatible robustness R per frame, (T,) float64, on raw uint8 arrays exactly as numpy computes
    `max(1 - ((1 - gt) * pred).sum() / (foreground.sum() + 1e-6), 0)` with uint8 operands.

    Emulated: `1 - gt` and `* pred` wrap modulo 256 (so with pred 0/255, a false-positive pixel weighs 255 and a
    pixel of two overlapping GT objects (gt = 2) weighs 255 * 255 mod 256 = 1); the sums are exact integers;
    the division is float64. Inputs are used as given: gt as decoded and summed by the release (0/1, or more
    where objects overlap), pred as read from its PNG (0/255), foreground 0/1.
    """
    gt_u8, pred_u8, fg_u8 = (as_tensor(x).to(torch.uint8) for x in (gt, pred, foreground))
    false_positive = sum_bytes((1 - gt_u8) * pred_u8).to(torch.float64)
    positive = sum_bytes(fg_u8).to(torch.float64)
    return torch.clamp(1 - false_positive / (positive + 1e-6), min=0.0)


def robustness_corrected_per_frame(gt: MaskLike, pred: MaskLike, foreground: MaskLike) -> torch.Tensor:
    """Robustness R per frame on binary masks, (T,) float64: max(1 - |pred & ~gt| / (|foreground| + 1e-6), 0)."""
    gt_b, pred_b, fg_b = (as_bool(x, None) for x in (gt, pred, foreground))
    false_positive = sum_bytes(pred_b & ~gt_b).to(torch.float64)
    positive = sum_bytes(fg_b).to(torch.float64)
    return torch.clamp(1 - false_positive / (positive + 1e-6), min=0.0)


@dataclass(frozen=True)
class ExpressionScore:
    """Scores of one expression over its video (each a mean over frames, in [0, 1]).

    type_id: ReVOS type (0 referring, 1 reasoning, 2 no target) or None where a dataset has none."""

    j: float
    f: float
    type_id: int | None = None
    r_release: float = float("nan")
    r_corrected: float = float("nan")

    @property
    def jf(self) -> float:
        return (self.j + self.f) / 2


@dataclass(frozen=True)
class SubsetScore:
    """Means over a subset's expressions (NaN for an empty subset); count = number of expressions."""

    j: float
    f: float
    jf: float
    r_release: float
    r_corrected: float
    count: int


def score_expression(
    pred: MaskLike,
    gt: MaskLike,
    type_id: int | None = None,
    foreground: MaskLike | None = None,
    bound_th: float = DEFAULT_BOUND_TH,
    device: torch.device | str | None = None,
) -> ExpressionScore:
    """J, F (means over all frames) and, given the video foreground, both R variants of one expression.

    pred, gt, foreground: (T, H, W); for R the release form sees gt as 0/1, pred as 0/255, foreground as 0/1."""
    j, f = j_and_f_per_frame(pred, gt, bound_th, device)
    r_release = r_corrected = float("nan")
    if foreground is not None:
        gt_b, pred_b = as_bool(gt, "cpu"), as_bool(pred, "cpu")
        fg_b = as_bool(foreground, "cpu")
        r_release = robustness_release_per_frame(gt_b.to(torch.uint8), pred_b.to(torch.uint8) * 255, fg_b)
        r_release = float(r_release.mean())
        r_corrected = float(robustness_corrected_per_frame(gt_b, pred_b, fg_b).mean())
    return ExpressionScore(float(j.mean()), float(f.mean()), type_id, r_release, r_corrected)


def subset_mean(scores: Sequence[ExpressionScore]) -> SubsetScore:
    """Means of J, F, J&F and R over expressions (J&F = mean of per-expression (J+F)/2)."""
    if not scores:
        nan = float("nan")
        return SubsetScore(nan, nan, nan, nan, nan, 0)
    columns = np.array([[s.j, s.f, s.jf, s.r_release, s.r_corrected] for s in scores], dtype=np.float64)
    j, f, jf, r_release, r_corrected = columns.mean(axis=0)
    return SubsetScore(float(j), float(f), float(jf), float(r_release), float(r_corrected), len(scores))


def revos_summary(scores: Sequence[ExpressionScore]) -> dict[str, SubsetScore]:
    """ReVOS table: "referring" (type 0), "reasoning" (type 1) and "overall", the macro mean of the two (type 2
    is excluded from J&F). An empty subset gives NaN; overall is then the mean of the subset that has members
    (NaN only when neither has)."""
    referring = subset_mean([s for s in scores if s.type_id == 0])
    reasoning = subset_mean([s for s in scores if s.type_id == 1])
    present = [s for s in (referring, reasoning) if s.count] or [referring]

    def macro(key: str) -> float:
        return float(np.mean([getattr(s, key) for s in present]))

    overall = SubsetScore(
        j=macro("j"),
        f=macro("f"),
        jf=macro("jf"),
        r_release=macro("r_release"),
        r_corrected=macro("r_corrected"),
        count=referring.count + reasoning.count,
    )
    return {"referring": referring, "reasoning": reasoning, "overall": overall}
