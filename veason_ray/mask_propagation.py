"""The mask-propagator seam: boxes on one frame in, a mask for every frame out.

The consistency reward and evaluation call only this interface; SAM2 implements it (actors/), tests use
small fakes.
"""

from __future__ import annotations

import abc

import numpy as np


class MaskPropagator(abc.ABC):
    @abc.abstractmethod
    def propagate(self, frames: np.ndarray, keyframe_position: int, boxes: np.ndarray) -> np.ndarray:
        """frames: (T, H, W, 3) uint8 RGB, the sampled frames in temporal order; keyframe_position: index into
        frames (0..T-1) of the frame the boxes are on; boxes: (K, 4) float32 x1,y1,x2,y2 in the pixels of `frames`.
        Returns (T, H, W) bool: OR over the K objects of the propagated masks (logits > 0). K == 0 -> all False."""
