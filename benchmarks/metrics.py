"""Benchmark: our batched J and F (veason_ray.metrics) against a straightforward per-frame reference of the
DAVIS formulas (numpy + OpenCV, written below), on the same masks in one run.

For each resolution it builds one synthetic video (random elliptic blobs for the GT, the prediction a shifted,
grown or shrunk copy with extra blobs, and a few empty / full / one-sided frames), checks that both give the
same per-frame J and F (largest absolute difference), and times both (warm-up, then the median of repeats; on
CUDA with events and synchronisation). The reference always runs on one CPU thread (cv2.setNumThreads(1));
ours runs on --device, with torch.set_num_threads(--threads) on CPU.

    PYTHONPATH=. python benchmarks/metrics.py --device cpu --threads 1
    PYTHONPATH=. python benchmarks/metrics.py --device cuda --out metrics.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import cv2
import numpy as np
import torch

from veason_ray.metrics import DEFAULT_BOUND_TH, j_and_f_per_frame

RESOLUTIONS = {"480p": (480, 854), "720p": (720, 1280), "1080p": (1080, 1920)}


# ---- reference: the DAVIS toolkit's formulas, one frame at a time -------------------------------------------
def reference_disk(radius: int) -> np.ndarray:
    """skimage.morphology.disk(radius): 1 where dx^2 + dy^2 <= r^2, as uint8 for cv2.dilate."""
    offsets = np.arange(-radius, radius + 1)
    x, y = np.meshgrid(offsets, offsets)
    return (x**2 + y**2 <= radius**2).astype(np.uint8)


def reference_seg2bmap(seg: np.ndarray) -> np.ndarray:
    """DAVIS `_seg2bmap` for a same-size map: one-pixel boundary against right, bottom, bottom-right."""
    seg = seg.astype(bool)
    e, s, se = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = seg ^ e | seg ^ s | seg ^ se
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = 0
    return b


def reference_f_measure(pred: np.ndarray, gt: np.ndarray, bound_th: float = DEFAULT_BOUND_TH) -> float:
    """DAVIS `f_measure(foreground_mask=pred, gt_mask=gt)` without void pixels."""
    bound_pix = bound_th if bound_th >= 1 else np.ceil(bound_th * np.linalg.norm(pred.shape))
    fg_boundary, gt_boundary = reference_seg2bmap(pred), reference_seg2bmap(gt)
    disk = reference_disk(int(bound_pix))
    fg_dil = cv2.dilate(fg_boundary.astype(np.uint8), disk)
    gt_dil = cv2.dilate(gt_boundary.astype(np.uint8), disk)
    gt_match = gt_boundary * fg_dil
    fg_match = fg_boundary * gt_dil
    n_fg, n_gt = np.sum(fg_boundary), np.sum(gt_boundary)
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1, 0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0, 1
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1, 1
    else:
        precision, recall = np.sum(fg_match) / float(n_fg), np.sum(gt_match) / float(n_gt)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def reference_jaccard(pred: np.ndarray, gt: np.ndarray) -> float:
    """DAVIS `db_eval_iou` of one frame: 1 when both masks are empty."""
    pred, gt = pred.astype(bool), gt.astype(bool)
    union = np.sum(pred | gt)
    return 1.0 if np.isclose(union, 0) else np.sum(pred & gt) / union


def reference_j_and_f(pred: np.ndarray, gt: np.ndarray, bound_th: float = DEFAULT_BOUND_TH) -> tuple:
    """Per-frame J and F of a (T, H, W) video, frame by frame."""
    j = np.array([reference_jaccard(p, g) for p, g in zip(pred, gt, strict=True)])
    f = np.array([reference_f_measure(p, g, bound_th) for p, g in zip(pred, gt, strict=True)])
    return j, f


# ---- synthetic masks --------------------------------------------------------------------------------------
def random_blobs(rng: np.random.Generator, height: int, width: int, count: int) -> np.ndarray:
    """(H, W) bool union of `count` random filled ellipses."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for _ in range(count):
        center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(2, width // 4)), int(rng.integers(2, height // 4)))
        cv2.ellipse(mask, center, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return mask.astype(bool)


def synthetic_video(rng: np.random.Generator, frames: int, height: int, width: int) -> tuple:
    """(pred, gt), each (T, H, W) bool: GT blobs, a perturbed prediction, and degenerate frames."""
    gt = np.stack([random_blobs(rng, height, width, int(rng.integers(1, 4))) for _ in range(frames)])
    pred = np.empty_like(gt)
    kernel = np.ones((9, 9), np.uint8)
    for t in range(frames):
        moved = np.roll(gt[t], (int(rng.integers(-12, 13)), int(rng.integers(-12, 13))), axis=(0, 1))
        grow = rng.integers(0, 3)
        if grow == 1:
            moved = cv2.dilate(moved.astype(np.uint8), kernel).astype(bool)
        elif grow == 2:
            moved = cv2.erode(moved.astype(np.uint8), kernel).astype(bool)
        pred[t] = moved | random_blobs(rng, height, width, int(rng.integers(0, 2)))
    if frames >= 4:  # both empty, prediction empty, GT empty, both full
        pred[0], gt[0] = False, False
        pred[1] = False
        gt[2] = False
        pred[3], gt[3] = True, True
    return pred, gt


def verify_odd_shapes(device: torch.device, seed: int) -> float:
    """Largest |ours - reference| over small videos of awkward sizes (1 pixel, not multiples of 64, ...)."""
    rng = np.random.default_rng(seed)
    worst = 0.0
    for height, width in [(1, 1), (1, 9), (9, 1), (7, 9), (63, 65), (64, 64), (65, 130), (97, 201)]:
        pred = rng.random((6, height, width)) < 0.4
        gt = rng.random((6, height, width)) < 0.4
        if min(height, width) >= 16:
            pred, gt = synthetic_video(rng, 6, height, width)
        for bound_th in (DEFAULT_BOUND_TH, 3):
            ours_j, ours_f = j_and_f_per_frame(pred, gt, bound_th=bound_th, device=device)
            ref_j, ref_f = reference_j_and_f(pred, gt, bound_th)
            worst = max(worst, float(np.abs(ours_j.cpu().numpy() - ref_j).max()))
            worst = max(worst, float(np.abs(ours_f.cpu().numpy() - ref_f).max()))
    return worst


# ---- timing -----------------------------------------------------------------------------------------------
def median_ms(run: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            run()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def benchmark_resolution(name: str, args: argparse.Namespace, rng: np.random.Generator) -> dict:
    height, width = RESOLUTIONS[name]
    device = torch.device(args.device)
    pred, gt = synthetic_video(rng, args.frames, height, width)
    ref_j, ref_f = reference_j_and_f(pred, gt)
    pred_d, gt_d = torch.from_numpy(pred).to(device), torch.from_numpy(gt).to(device)
    ours_j, ours_f = j_and_f_per_frame(pred_d, gt_d)
    max_diff = float(
        max(np.abs(ours_j.cpu().numpy() - ref_j).max(), np.abs(ours_f.cpu().numpy() - ref_f).max())
    )
    ours_ms = median_ms(lambda: j_and_f_per_frame(pred_d, gt_d), args.repeats, args.warmup, device)
    with_copy_ms = median_ms(lambda: j_and_f_per_frame(pred, gt, device=device), args.repeats, 1, device)
    ref_ms = median_ms(lambda: reference_j_and_f(pred, gt), args.ref_repeats, 1, torch.device("cpu"))
    return {
        "resolution": name,
        "height": height,
        "width": width,
        "device": device_name(device, args.threads),
        "frames": args.frames,
        "ours_ms_per_video": ours_ms,
        "ours_with_host_copy_ms_per_video": with_copy_ms,
        "reference_ms_per_video": ref_ms,
        "speed_ratio": ref_ms / ours_ms,
        "max_abs_diff": max_diff,
        "mean_j": float(ref_j.mean()),
        "mean_f": float(ref_f.mean()),
    }


def device_name(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({threads} thread{'s' if threads > 1 else ''}, {platform.processor() or platform.machine()})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for ours (reference: 1)")
    parser.add_argument("--resolutions", default="480p,720p,1080p")
    parser.add_argument("--frames", type=int, default=30, help="frames per video")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ref-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(1)
    odd_shapes_diff = verify_odd_shapes(torch.device(args.device), args.seed)
    print(f"odd shapes (1x1 ... 97x201), largest |ours - reference|: {odd_shapes_diff:.1e}")
    rng = np.random.default_rng(args.seed)
    rows = [benchmark_resolution(name, args, rng) for name in args.resolutions.split(",")]
    header = "| resolution | device | frames | ours ms/video | ours + host copy | reference ms/video | speed ratio | max abs diff |"
    print(header)
    print("|" + "---|" * 8)
    for r in rows:
        print(
            f"| {r['resolution']} ({r['width']}x{r['height']}) | {r['device']} | {r['frames']} "
            f"| {r['ours_ms_per_video']:.2f} | {r['ours_with_host_copy_ms_per_video']:.2f} "
            f"| {r['reference_ms_per_video']:.1f} | {r['speed_ratio']:.1f}x | {r['max_abs_diff']:.1e} |"
        )
    if args.out:
        meta = {
            "torch": torch.__version__,
            "opencv": cv2.__version__,
            "numpy": np.__version__,
            "odd_shapes_max_abs_diff": odd_shapes_diff,
        }
        with open(args.out, "w") as handle:
            json.dump({"meta": meta, "args": vars(args), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
