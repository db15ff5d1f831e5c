"""Masks of a video to files: one grayscale PNG per frame, or one COCO-RLE JSON document per video.

The PNGs hold 0 (background) and 255 (foreground), which is what the public ReVOS, MeViS and ReasonVOS
evaluation scripts read (``cv2.imread(path, cv2.IMREAD_GRAYSCALE)`` then a threshold). The RLE document is
plain JSON; each frame's RLE is the one of :mod:`veason_ray.datasets.rle`. Storage goes through
:class:`~veason_ray.object_store.ObjectStore`, so a folder may be local or on S3.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from veason_ray.datasets.rle import encode_mask
from veason_ray.object_store import ObjectStore, join_uri

FOREGROUND = 255  # PNG value of a mask pixel; background is 0


def _check_video_masks(masks: np.ndarray, frame_names: Sequence[str], where: str) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"{where}: expected masks of shape (T, H, W), got {masks.shape}")
    if len(frame_names) != len(masks):
        raise ValueError(f"{where}: {len(frame_names)} frame names for {len(masks)} mask frames")
    return masks.astype(bool, copy=False)


def mask_png(mask: np.ndarray) -> bytes:
    """A (H, W) boolean mask as an 8-bit grayscale PNG: 255 where the mask is set, 0 elsewhere."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask_png: expected a 2-D mask, got shape {mask.shape}")
    ok, data = cv2.imencode(".png", mask.astype(bool).astype(np.uint8) * FOREGROUND)
    if not ok:
        raise ValueError(f"mask_png: could not encode a {mask.shape} mask as PNG")
    return data.tobytes()


def read_mask_png(data: bytes) -> np.ndarray:
    """PNG (or any image cv2 decodes) bytes as a (H, W) bool mask: nonzero gray value = foreground."""
    if not data:
        raise ValueError("read_mask_png: empty data, not an image")
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ValueError(f"read_mask_png: {len(data)} bytes that are not a decodable image")
    return image > 0


def write_mask_pngs(
    store: ObjectStore, folder_uri: str, masks: np.ndarray, frame_names: Sequence[str]
) -> int:
    """Write ``<folder_uri>/<frame_name>.png`` for each frame of ``masks`` (T, H, W) bool; returns T."""
    masks = _check_video_masks(masks, frame_names, "write_mask_pngs")
    for mask, name in zip(masks, frame_names, strict=True):
        store.write_bytes(join_uri(folder_uri, f"{name}.png"), mask_png(mask))
    return len(masks)


def masks_to_rle(masks: np.ndarray) -> list[dict]:
    """Per frame of ``masks`` (T, H, W) bool, its COCO RLE ``{"size": [H, W], "counts": str}``."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks_to_rle: expected masks of shape (T, H, W), got {masks.shape}")
    return [encode_mask(mask) for mask in masks]


def rle_document(masks: np.ndarray, frame_names: Sequence[str], extra: dict | None = None) -> dict:
    """One JSON-serialisable document for the masks (T, H, W) bool of a video::

        {"format": "coco_rle", "height": H, "width": W,
         "frames": [{"frame": name, "index": i, "rle": {...}, "area": pixels}, ...], **extra}

    ``extra`` (e.g. the video and expression ids) may not replace the keys above."""
    masks = _check_video_masks(masks, frame_names, "rle_document")
    extra = dict(extra or {})
    doc: dict = {"format": "coco_rle", "height": int(masks.shape[1]), "width": int(masks.shape[2])}
    doc["frames"] = [
        {"frame": str(name), "index": i, "rle": rle, "area": int(mask.sum())}
        for i, (name, mask, rle) in enumerate(zip(frame_names, masks, masks_to_rle(masks), strict=True))
    ]
    clashes = sorted(set(extra) & set(doc))
    if clashes:
        raise ValueError(f"rle_document: extra keys {clashes} would replace the document's own")
    return {**doc, **extra}
