"""Dataset readers for ReVOS, MeViS, ReasonVOS and ViCaS (docs/method.md section 2), local or s3://.

ds = open_dataset("revos", "s3://bucket/ReVOS", "train", storage)
for expr in ds.expressions():
    frames = ds.read_frames(expr.video, [0, 5, 10])   # (T, H, W, 3) uint8 RGB
    gt = ds.gt_masks(expr, [0, 5, 10])                # (T, H, W) bool union of the targets
"""

from __future__ import annotations

from veason_ray.config import StorageConfig
from veason_ray.datasets.base import DatasetFormatError, VOSDataset
from veason_ray.datasets.mevis import MeViSDataset
from veason_ray.datasets.reasonvos import ReasonVOSDataset
from veason_ray.datasets.records import (
    TYPE_NAMES,
    TYPE_NO_TARGET,
    TYPE_REASONING,
    TYPE_REFERRING,
    ExpressionRecord,
    MissingMaskEntryError,
    VideoInfo,
)
from veason_ray.datasets.revos import ReVOSDataset
from veason_ray.datasets.rle import RLEFormatError, decode_rle, encode_mask, union_masks
from veason_ray.datasets.selection import select_expressions
from veason_ray.datasets.vicas import SkippedEntry, ViCaSDataset

DATASETS: dict[str, type[VOSDataset]] = {
    "revos": ReVOSDataset,
    "mevis": MeViSDataset,
    "reasonvos": ReasonVOSDataset,
    "vicas": ViCaSDataset,
}
DEFAULT_SPLITS = {"revos": "train", "mevis": "train", "reasonvos": "valid", "vicas": "val"}


def open_dataset(
    kind: str, root: str, split: str | None = None, storage: StorageConfig | None = None
) -> VOSDataset:
    """Open one split of a dataset (``kind``: revos, mevis, reasonvos or vicas) under a local folder or s3://
    prefix. The expression file is read and validated now; frames and masks are read when asked for."""
    if kind not in DATASETS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[kind](root, split or DEFAULT_SPLITS[kind], storage)


__all__ = [
    "DATASETS",
    "DatasetFormatError",
    "ExpressionRecord",
    "MeViSDataset",
    "MissingMaskEntryError",
    "RLEFormatError",
    "ReVOSDataset",
    "ReasonVOSDataset",
    "SkippedEntry",
    "TYPE_NAMES",
    "TYPE_NO_TARGET",
    "TYPE_REASONING",
    "TYPE_REFERRING",
    "VOSDataset",
    "ViCaSDataset",
    "VideoInfo",
    "decode_rle",
    "encode_mask",
    "open_dataset",
    "select_expressions",
    "union_masks",
]
