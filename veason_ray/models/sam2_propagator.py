"""SAM2 as the method's mask propagator: boxes on the keyframe in, a mask on every sampled frame out.

Each box becomes its own SAM2 object on the keyframe; SAM2's video predictor tracks all of them forward to the
last frame and backward to the first, and the mask of a frame is the OR over objects of `logits > 0`, at the
frames' own height and width (docs/method.md section 4, consistency reward; section 1, inference).

Frames stay in memory: the inference state is built from the uint8 array with exactly the resize and
normalisation of sam2's JPEG-folder loader, so the masks equal those of sam2's own file-based path on the same
pixels. This is the plain, one-clip-at-a-time implementation and the reference for
`veason_ray/models/sam2_group.py`, which shares image features and batches objects across a GRPO step.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from veason_ray.cpu_torch_workarounds import apply_cpu_workarounds
from veason_ray.mask_propagation import MaskPropagator, checked_propagation_inputs, propagation_order

apply_cpu_workarounds()

import torch  # noqa: E402
from PIL import Image  # noqa: E402

if TYPE_CHECKING:
    from sam2.sam2_video_predictor import SAM2VideoPredictor

# sam2.utils.misc.load_video_frames defaults (ImageNet statistics).
SAM2_IMG_MEAN = (0.485, 0.456, 0.406)
SAM2_IMG_STD = (0.229, 0.224, 0.225)


def sam2_input_frames(frames: np.ndarray, image_size: int, threads: int = 1) -> torch.Tensor:
    """(T, 3, S, S) float32 SAM2 input from (T, H, W, 3) uint8 RGB frames, S = image_size: PIL's default
    resize to S x S, scaled to [0, 1] in float64, then float32 mean/std normalisation, the same operations in the
    same order as `sam2.utils.misc.load_video_frames_from_jpg_images`, so results are bit-identical. `threads`
    frames are prepared at once (PIL and numpy release the GIL; each frame is written into its own slice)."""
    images = torch.empty(len(frames), 3, image_size, image_size, dtype=torch.float32)
    mean = torch.tensor(SAM2_IMG_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(SAM2_IMG_STD, dtype=torch.float32)[:, None, None]
    inference = torch.is_inference_mode_enabled()  # thread-local: the workers take the caller's mode

    def prepare(index: int) -> None:
        resized = np.array(Image.fromarray(frames[index]).resize((image_size, image_size)))
        with torch.inference_mode(inference):
            image = images[index]
            image.copy_(
                torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)) / 255.0)
            )  # CHW first
            image -= mean
            image /= std

    if threads > 1 and len(frames) > 1:
        with ThreadPoolExecutor(min(threads, len(frames))) as pool:
            list(pool.map(prepare, range(len(frames))))
    else:
        for index in range(len(frames)):
            prepare(index)
    return images


def init_state_from_frames(
    predictor: SAM2VideoPredictor, frames: np.ndarray, threads: int = 1
) -> dict[str, Any]:
    """The inference state `SAM2VideoPredictor.init_state` builds for a video, from in-memory frames.

    Mirrors sam2 1.1.0's `init_state` (frames on the model's device, state not offloaded) except that it does not
    pre-compute frame 0's features, which propagation computes when it needs them; the result is the same."""
    device = predictor.device
    _, height, width, _ = frames.shape
    return {
        "images": sam2_input_frames(frames, predictor.image_size, threads).to(device),
        "num_frames": len(frames),
        "offload_video_to_cpu": False,
        "offload_state_to_cpu": False,
        "video_height": height,
        "video_width": width,
        "device": device,
        "storage_device": device,
        "point_inputs_per_obj": {},
        "mask_inputs_per_obj": {},
        "cached_features": {},
        "constants": {},
        "obj_id_to_idx": OrderedDict(),
        "obj_idx_to_id": OrderedDict(),
        "obj_ids": [],
        "output_dict_per_obj": {},
        "temp_output_dict_per_obj": {},
        "frames_tracked_per_obj": {},
    }


def tracked_frames(
    predictor: SAM2VideoPredictor, state: dict[str, Any], keyframe_position: int, boxes: np.ndarray
) -> Iterator[tuple[int, torch.Tensor]]:
    """Add each box as its own object on the keyframe of an inference state and propagate forward, then
    backward: (frame position, (H, W) bool mask on the predictor's device, the OR over objects of logits > 0)
    for every frame once, in `propagation_order`."""
    for obj_id, box in enumerate(boxes, start=1):
        predictor.add_new_points_or_box(state, frame_idx=keyframe_position, obj_id=obj_id, box=box)
    for reverse in (False, True):
        for frame_idx, _, logits in predictor.propagate_in_video(
            state, start_frame_idx=keyframe_position, reverse=reverse
        ):
            if reverse and frame_idx == keyframe_position:
                continue  # the backward pass starts on the keyframe again, with the same output
            yield frame_idx, (logits[:, 0] > 0).any(dim=0)


def track_boxes(
    predictor: SAM2VideoPredictor,
    state: dict[str, Any],
    keyframe_position: int,
    boxes: np.ndarray,
    out: np.ndarray,
) -> np.ndarray:
    """`tracked_frames` written into `out` (T, H, W) bool; returns `out`."""
    for frame_idx, mask in tracked_frames(predictor, state, keyframe_position, boxes):
        out[frame_idx] = mask.cpu().numpy()
    return out


class SAM2MaskPropagator(MaskPropagator):
    """Propagates keyframe boxes through a clip with a (frozen) SAM2 video predictor; see the module docstring.
    Not thread-safe: one propagation at a time per predictor."""

    def __init__(self, predictor: SAM2VideoPredictor, preprocess_threads: int = 1):
        self.predictor = predictor
        self.preprocess_threads = max(1, preprocess_threads)  # frames resized at once (sam2_input_frames)

    def _autocast(self) -> contextlib.AbstractContextManager:
        # SAM2 runs in bf16 on GPUs (as in its own demos); CPU autocast would only slow it down and change masks.
        if self.predictor.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def propagate(self, frames: np.ndarray, keyframe_position: int, boxes: np.ndarray) -> np.ndarray:
        frames, keyframe_position, boxes = checked_propagation_inputs(frames, keyframe_position, boxes)
        num_frames, height, width, _ = frames.shape
        masks = np.zeros((num_frames, height, width), dtype=bool)
        if len(boxes) == 0:
            return masks
        with self._autocast():
            state = init_state_from_frames(self.predictor, frames, self.preprocess_threads)
            track_boxes(self.predictor, state, keyframe_position, boxes, masks)
        return masks

    def propagate_frames(
        self, frames: np.ndarray, keyframe_position: int, boxes: np.ndarray
    ) -> Iterator[tuple[int, np.ndarray]]:
        frames, keyframe_position, boxes = checked_propagation_inputs(frames, keyframe_position, boxes)
        num_frames, height, width, _ = frames.shape
        if len(boxes) == 0:
            for position in propagation_order(num_frames, keyframe_position):
                yield position, np.zeros((height, width), dtype=bool)
            return
        with torch.inference_mode(), self._autocast():
            state = init_state_from_frames(self.predictor, frames, self.preprocess_threads)
            for position, mask in tracked_frames(self.predictor, state, keyframe_position, boxes):
                yield position, mask.cpu().numpy()
