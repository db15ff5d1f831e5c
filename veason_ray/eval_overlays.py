"""The pictures of an evaluation (`veason eval`): an expression's overlay video and its still, each with the
question, a legend, the ground truth and J, F, J&F; and which expressions the worst overlays show.

Files, in `<eval.output_dir>/overlays/`: `<video>__<exp_id>.mp4` (keys in `eval.overlays`) and
`worst_<video>__<exp_id>.mp4` (the worst ones), each with its still beside it (same name, .png).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from veason_ray.evaluation import ExpressionResult, region_boxes
from veason_ray.visualize import (
    BOX_COLOUR,
    GT_COLOUR,
    PRED_COLOUR,
    Caption,
    ground_truth_keyframe,
    write_overlay_video,
)


def overlay_name(key: str, suffix: str = ".mp4") -> str:
    """The file name of an expression's overlay video (of its still: suffix ".png")."""
    return key.replace("/", "__") + suffix


def overlay_caption(result: ExpressionResult, gt_keyframe: int | None) -> Caption:
    """What an overlay says below its frames: the question, which colour is which, J, F and J&F (percent)."""
    if result.keyframe is None:
        answer = f"answer: no keyframe ({result.parse_failure or result.empty_reason or 'no boxes'})"
    else:
        answer = f"answer: keyframe t={result.keyframe}, {len(result.boxes)} box(es)"
    truth = "no target" if gt_keyframe is None else f"outline, boxes on its keyframe t={gt_keyframe}"
    return Caption(
        result.expression,
        ((PRED_COLOUR, "predicted mask"), (BOX_COLOUR, answer), (GT_COLOUR, f"ground truth: {truth}")),
        f"J {100 * result.j:.1f} | F {100 * result.f:.1f} | J&F {100 * result.jf:.1f}",
    )


def draw_overlay(
    path: Path, frames: np.ndarray, masks: np.ndarray, gt: np.ndarray, result: ExpressionResult, fps: float
) -> Path:
    """An expression's overlay video at `path` and its still beside it (`path` with ".png"; the answer's
    keyframe): predicted masks, the GT outline, the answer's boxes on its keyframe, the GT boxes (one per
    connected region of the GT mask) on the sampled frame with the largest GT area, the `overlay_caption`.
    frames (T, H, W, 3) uint8 RGB, masks and gt (T, H, W) bool, every frame of the video."""
    indices = result.frame_indices or list(range(len(gt)))
    gt_keyframe = ground_truth_keyframe(gt[indices], indices)
    return write_overlay_video(
        path,
        frames,
        masks,
        keyframe=result.keyframe,
        boxes=np.asarray(result.boxes, np.float32).reshape(-1, 4),
        gt_masks=gt,
        fps=fps,
        gt_keyframe=gt_keyframe,
        gt_boxes=None if gt_keyframe is None else region_boxes(gt[gt_keyframe]),
        band=overlay_caption(result, gt_keyframe),
        still=path.with_suffix(".png"),
    )


def pick_worst(results: Sequence[ExpressionResult], count: int) -> list[ExpressionResult]:
    """The `count` expressions the worst overlays show, among those scored with a target (no error, not
    no-target, finite J&F): the lowest-J&F expression of each video first, so the pictures cover as many
    videos as they can, then the lowest of the rest; ties broken by key."""
    scored = sorted(
        (r for r in results if r.error is None and r.type_id != 2 and not math.isnan(r.jf)),
        key=lambda r: (r.jf, r.key),
    )
    firsts: dict[str, ExpressionResult] = {}
    for result in scored:
        firsts.setdefault(result.video, result)
    chosen = {r.key for r in firsts.values()}
    return ([*firsts.values()] + [r for r in scored if r.key not in chosen])[: max(count, 0)]
