"""The frames a CoT teacher sees and the frames the SFT record keeps (docs/method.md section 6).

Teacher images: the original frame shrunk (never enlarged) to fit within 640x480 with its aspect ratio kept,
then a red box drawn around each target object present on that frame (one box per object, 2 pixels wide,
lying just outside the object's tight box so no object pixel is painted over). Record images: the clean frame
at 560x560 (bilinear, as the policy sees it), stored as JPEG quality 95.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from veason_ray.boxes import FRAME_SIZE
from veason_ray.frames import resize_frames

RED = (255, 0, 0)  # RGB
TEACHER_MAX_SIZE = (640, 480)  # (width, height) in pixels
RECORD_JPEG_QUALITY = 95


def fit_within(width: int, height: int, max_width: int, max_height: int) -> tuple[int, int]:
    """(width, height) of an image shrunk to fit within max_width x max_height, aspect ratio kept; an image
    that already fits keeps its size. Each side is at least 1 pixel."""
    if width < 1 or height < 1 or max_width < 1 or max_height < 1:
        raise ValueError(f"sizes must be positive, got {width}x{height} within {max_width}x{max_height}")
    scale = min(1.0, max_width / width, max_height / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def draw_boxes(
    image: np.ndarray, boxes: Sequence[Sequence[float]] | np.ndarray, thickness: int = 2, color=RED
) -> np.ndarray:
    """A copy of the (H, W, 3) uint8 RGB ``image`` with a ``thickness``-pixel frame around each box.

    Boxes are inclusive pixel boxes [x1, y1, x2, y2] of this image (rounded to integers); the frame covers the
    ring between the box grown by ``thickness`` and the box itself, clipped to the image."""
    out = np.array(image, dtype=np.uint8, copy=True)
    height, width = out.shape[:2]
    for box in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        outer = np.zeros((height, width), bool)
        outer[
            max(y1 - thickness, 0) : max(y2 + thickness + 1, 0),
            max(x1 - thickness, 0) : max(x2 + thickness + 1, 0),
        ] = True
        outer[max(y1, 0) : max(y2 + 1, 0), max(x1, 0) : max(x2 + 1, 0)] = False
        out[outer] = color
    return out


def teacher_image(
    frame: np.ndarray,
    object_boxes: Sequence[np.ndarray | None],
    max_size: tuple[int, int] = TEACHER_MAX_SIZE,
    thickness: int = 2,
) -> np.ndarray:
    """The teacher's view of one frame: ``frame`` (H, W, 3) uint8 RGB fitted within ``max_size`` (width, height;
    area interpolation when shrinking) with a red box around each present object. ``object_boxes``: per target
    object its tight box [x1, y1, x2, y2] in original pixels (inclusive), or None when absent on this frame."""
    height, width = frame.shape[:2]
    new_w, new_h = fit_within(width, height, *max_size)
    image = (
        frame
        if (new_w, new_h) == (width, height)
        else cv2.resize(frame, (new_w, new_h), interpolation=cv2.INTER_AREA)
    )
    sx, sy = new_w / width, new_h / height
    # pixel i spans [i, i+1) in original pixels: scale the spans, then take the inclusive end again
    scaled = [
        [box[0] * sx, box[1] * sy, (box[2] + 1) * sx - 1, (box[3] + 1) * sy - 1]
        for box in object_boxes
        if box is not None
    ]
    return draw_boxes(image, scaled, thickness)


def record_frames(frames: np.ndarray, size: int = FRAME_SIZE) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB -> (T, size, size, 3): the clean frames the SFT record stores (bilinear)."""
    return resize_frames(frames, size)


def encode_jpeg(image: np.ndarray, quality: int = RECORD_JPEG_QUALITY) -> bytes:
    """(H, W, 3) uint8 RGB -> JPEG bytes."""
    ok, data = cv2.imencode(
        ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise ValueError(f"could not encode a {image.shape} image as JPEG")
    return data.tobytes()
