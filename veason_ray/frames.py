"""Frame preparation for the policy: frames are resized to 560x560 (bilinear, aspect ratio not kept)."""

from __future__ import annotations

import cv2
import numpy as np

from veason_ray.boxes import FRAME_SIZE


def resize_frames(frames: np.ndarray, size: int = FRAME_SIZE) -> np.ndarray:
    """(T, H, W, 3) or (H, W, 3) uint8 RGB -> the same at size x size, bilinear (docs/method.md section 3)."""
    array = np.asarray(frames)
    if array.ndim == 3:
        return cv2.resize(array, (size, size), interpolation=cv2.INTER_LINEAR)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3) or (H, W, 3) RGB, got shape {array.shape}")
    return np.stack([cv2.resize(frame, (size, size), interpolation=cv2.INTER_LINEAR) for frame in array])
