"""Pictures people would rather look at than read: masks over frames, boxes on the keyframe."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

GT_COLOUR = (255, 0, 255)  # ground-truth outline: magenta
PRED_COLOUR = (255, 40, 40)  # predicted mask: red tint
BOX_COLOUR = (255, 220, 0)  # predicted boxes on the keyframe: yellow


def overlay_frame(
    frame: np.ndarray, pred_mask: np.ndarray | None, gt_mask: np.ndarray | None, alpha: float = 0.45
) -> np.ndarray:
    """One (H, W, 3) uint8 RGB frame with the predicted mask tinted and the GT mask outlined."""
    out = frame.astype(np.float32).copy()
    if pred_mask is not None and pred_mask.any():
        out[pred_mask] = (1 - alpha) * out[pred_mask] + alpha * np.array(PRED_COLOUR, dtype=np.float32)
    out = out.clip(0, 255).astype(np.uint8)
    if gt_mask is not None and gt_mask.any():
        contours, _ = cv2.findContours(gt_mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, GT_COLOUR, 1)
    return out


def video_overlay_grid(
    frames: np.ndarray,
    pred_masks: np.ndarray,
    gt_masks: np.ndarray,
    keyframe: int | None = None,
    boxes: np.ndarray | None = None,
    columns: int = 4,
    max_frames: int = 12,
) -> np.ndarray:
    """A grid of up to `max_frames` evenly chosen frames (T, H, W, 3) with masks; the keyframe carries the
    boxes the propagator was given (in the frames' pixels) and a yellow border."""
    count = len(frames)
    chosen = np.unique(np.linspace(0, count - 1, num=min(count, max_frames)).round().astype(int)).tolist()
    if keyframe is not None and 0 <= keyframe < count and keyframe not in chosen:
        chosen = sorted(chosen[:-1] + [keyframe])
    tiles = []
    for index in chosen:
        tile = overlay_frame(frames[index], pred_masks[index], gt_masks[index])
        if index == keyframe:
            for x1, y1, x2, y2 in boxes if boxes is not None else []:
                cv2.rectangle(tile, (int(x1), int(y1)), (int(x2), int(y2)), BOX_COLOUR, 2)
            cv2.rectangle(tile, (0, 0), (tile.shape[1] - 1, tile.shape[0] - 1), BOX_COLOUR, 3)
        cv2.putText(
            tile, f"t={index}", (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA
        )
        tiles.append(tile)
    rows = -(-len(tiles) // columns)
    height, width = tiles[0].shape[:2]
    grid = np.zeros((rows * height, min(columns, len(tiles)) * width, 3), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        grid[r * height : (r + 1) * height, c * width : (c + 1) * width] = tile
    return grid


def save_png(image: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path
