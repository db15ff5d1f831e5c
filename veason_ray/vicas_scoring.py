"""ViCaS's own score of its LG-VIS task (docs/method.md section 7): track mAP, beside the J&F that `veason eval`
reports for every benchmark, and the ViCaS lines of an evaluation summary.

Track mAP, as the release's `vicas/evaluation/main.py` + `seg_eval.py` (github.com/Ali2500/ViCaS) define it: on
the human-annotated frames only, a predicted track's IoU with a ground-truth track is the intersection summed over
the frames divided by the union summed over the frames (0 when both are empty); per prompt and IoU threshold
(0.50, 0.55, ..., 0.95) a prediction that reaches the threshold with a ground-truth track of its prompt is a true
positive, else a false positive; the predictions of every prompt of the split are ranked by score, and AP is the
area under the precision envelope against recall over all ground-truth tracks of the split (all-point
interpolation). mAP is the mean over the thresholds; AP at 0.5, 0.75 and 0.9 are reported too.

What we submit, per prompt: the one mask track the method predicts (the union of its boxes' SAM2 masks), with
score 1 (the policy gives no confidence; the official script's default), or nothing when that track is empty on
every scored frame. Tied scores keep the benchmark's order (video id, then prompt).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from veason_ray.datasets import ViCaSDataset
    from veason_ray.evaluation import ExpressionResult

IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))
REPORTED_THRESHOLDS = {"ap50": 0.5, "ap75": 0.75, "ap90": 0.9}


def track_ious(predicted: np.ndarray, objects: np.ndarray) -> list[float]:
    """IoU of a predicted track (T, H, W) with each ground-truth track (K, T, H, W) over the T frames at once:
    summed intersection over summed union, 0 when both tracks are empty."""
    predicted = np.asarray(predicted, bool)[None]
    objects = np.asarray(objects, bool)
    inter = (predicted & objects).reshape(len(objects), -1).sum(axis=1)
    union = (predicted | objects).reshape(len(objects), -1).sum(axis=1)
    return [float(i / u) if u else 0.0 for i, u in zip(inter, union, strict=True)]


def lgvis_entry(predicted: np.ndarray, objects: np.ndarray) -> dict[str, Any]:
    """What the track mAP needs of one prompt (JSON-ready, kept in its result's ``extra``): the predicted track's
    IoU with each of its ground-truth tracks, and whether it is submitted (not empty on every scored frame)."""
    return {"track_ious": track_ious(predicted, objects), "submitted": bool(np.asarray(predicted).any())}


def average_precision(hits: Sequence[bool], num_gt: int) -> float:
    """AP of ranked predictions (``hits``: each one a true positive or not) against ``num_gt`` ground-truth tracks:
    the precision envelope summed over the recall steps. No prediction: 0; no ground truth: 1 (as ViCaS's)."""
    hits = np.asarray(hits, bool)
    if not hits.size:
        return 0.0
    if num_gt == 0:
        return 1.0
    precision = np.cumsum(hits) / np.arange(1, hits.size + 1)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    return float(envelope[hits].sum() / num_gt)


def track_map(entries: Sequence[dict[str, Any]]) -> dict[str, float | int]:
    """ViCaS's LG-VIS score of prompts in benchmark order (each an :func:`lgvis_entry`): mAP, AP50, AP75, AP90 in
    [0, 1], the counts of prompts, ground-truth tracks and submitted tracks."""
    num_gt = sum(len(e["track_ious"]) for e in entries)
    best = [max(e["track_ious"], default=0.0) for e in entries if e["submitted"]]
    aps = {t: average_precision([iou >= t for iou in best], num_gt) for t in IOU_THRESHOLDS}
    return {
        "map": float(np.mean(list(aps.values()))),
        **{name: aps[t] for name, t in REPORTED_THRESHOLDS.items()},
        "prompts": len(entries),
        "gt_tracks": num_gt,
        "submitted_tracks": len(best),
    }


def vicas_summary(dataset: ViCaSDataset, results: Sequence[ExpressionResult]) -> dict[str, Any]:
    """The ViCaS parts of summary.json: ``lgvis`` (:func:`track_map` over the evaluated prompts, in the
    dataset's order) and ``left_out`` (the reader's skipped videos and prompts, by reason)."""
    order = {record.key: i for i, record in enumerate(dataset.expressions())}
    scored = [r for r in results if r.error is None and "lgvis" in r.extra]
    scored.sort(key=lambda r: order.get(r.key, len(order)))
    return {"lgvis": track_map([r.extra["lgvis"] for r in scored]), "left_out": dataset.skipped_counts}


def vicas_summary_lines(summary: dict[str, Any]) -> list[str]:
    """Sentences for summary.md and the console: the track mAP and what the reader left out ([] for a summary
    without them: the other benchmarks)."""
    if "lgvis" not in summary:
        return []
    s = summary["lgvis"]
    aps = ", ".join(f"{name.upper()} {100 * s[name]:.1f}" for name in REPORTED_THRESHOLDS)
    lines = [
        f"LG-VIS track mAP (ViCaS's score, human-annotated frames): {100 * s['map']:.1f} ({aps}; "
        f"{s['prompts']} prompts, {s['gt_tracks']} ground-truth tracks, one predicted track per prompt)."
    ]
    if summary.get("left_out"):
        counts = ", ".join(f"{reason} {n}" for reason, n in summary["left_out"].items())
        lines.append(f"Left out when the split was read (see the reader's warnings): {counts}.")
    return lines
