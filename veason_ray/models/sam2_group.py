"""Group-shared SAM2 propagation: many (video, keyframe, boxes) requests at once, each frame encoded once.

The n answers of a GRPO group share their video, and a reward step holds many groups. The release runs one
full SAM2 propagation per answer (decode, encode every frame, track each object alone). Here:

1. Image features: each distinct video's T frames go through the image encoder once, batched
   (`encode_frames`), and every object of every request on that video reads them.
2. Objects: each matched box is one SAM2 object (docs/method.md section 4). Identical objects (same video,
   keyframe and box) are propagated once, so answers that repeat an earlier answer's boxes reuse its result.
3. Tracking: objects prompted on the same keyframe of clips of the same length go through SAM2's own
   `track_step` as one batch, for all videos at once; each object keeps its own memory bank.

Why batching gives the per-sample result. In sam2 1.1.0, `SAM2VideoPredictor.propagate_in_video` already
tracks the objects of one state one at a time (batch 1, a memory bank per object), and everything in
`track_step` (memory attention, SAM heads, memory encoder) works on each batch element separately; the only
cross-object operations are `non_overlap_masks_for_mem_enc` (batch 1 in the predictor, so a no-op there) and
`non_overlap_masks` on the output (it never changes the OR over objects: the best object at a pixel keeps its
score). Objects prompted on one keyframe of equally long clips see the same frame order and the same memory
layout, so one batched `track_step` per frame does the predictor's per-object work in one call. This module
mirrors `_run_single_frame_inference` and `propagate_in_video_preflight` step by step (bf16 memory features,
hole filling, the memory encoder on the keyframe's upsampled mask); predictors configured with options that
couple objects or rewrite memory (`non_overlap_masks_for_mem_enc`, `clear_non_cond_mem_around_input`) are
served by the plain per-request `SAM2MaskPropagator` instead. tests/test_sam2_group.py checks equality with the
plain per-sample propagator on CPU; on GPU, batched kernels may round differently (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from veason_ray.cpu_torch_workarounds import apply_cpu_workarounds
from veason_ray.mask_propagation import MaskPropagator, PropagationRequest, check_propagation_inputs
from veason_ray.models.sam2_propagator import SAM2MaskPropagator, sam2_input_frames

apply_cpu_workarounds()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sam2.utils.misc import fill_holes_in_mask_scores  # noqa: E402

if TYPE_CHECKING:
    from sam2.sam2_video_predictor import SAM2VideoPredictor


@dataclass(frozen=True)
class PropagationStats:
    """What the last `propagate_many` did: requests, distinct videos encoded, frames encoded, distinct objects
    tracked, and batched `track_step` calls."""

    requests: int
    videos: int
    frames_encoded: int
    objects: int
    track_calls: int


@dataclass
class FrameFeatures:
    """A video's image-encoder output: `fpn` per feature level (T, C, H, W) (levels 0 and 1 already
    projected by the mask decoder, as `forward_image` leaves them), `pos` per level (1, C, H, W) (the sine
    position encoding depends on the shape only), and the frames' height and width in pixels."""

    fpn: list[torch.Tensor]
    pos: list[torch.Tensor]
    height: int
    width: int

    @property
    def num_frames(self) -> int:
        return int(self.fpn[0].shape[0])


def couples_objects(predictor: SAM2VideoPredictor) -> bool:
    """Whether this predictor's configuration makes objects of one state interact (then batching is off)."""
    return bool(
        getattr(predictor, "non_overlap_masks_for_mem_enc", False)
        or getattr(predictor, "clear_non_cond_mem_around_input", False)
    )


class SAM2GroupPropagator(MaskPropagator):
    """Batched, feature-sharing SAM2 propagation (see the module docstring). Not thread-safe.

    encode_batch_size: frames per image-encoder call; max_objects_per_batch: objects per `track_step` call
    (bounds GPU memory); preprocess_threads: threads resizing frames on the CPU (PIL releases the GIL)."""

    def __init__(
        self,
        predictor: SAM2VideoPredictor,
        *,
        encode_batch_size: int = 8,
        max_objects_per_batch: int = 64,
        preprocess_threads: int = 4,
    ):
        if encode_batch_size < 1 or max_objects_per_batch < 1:
            raise ValueError("encode_batch_size and max_objects_per_batch must be >= 1")
        self.predictor = predictor
        self.encode_batch_size = encode_batch_size
        self.max_objects_per_batch = max_objects_per_batch
        self.preprocess_threads = max(1, preprocess_threads)
        self.plain = SAM2MaskPropagator(predictor, self.preprocess_threads)
        self.last_stats = PropagationStats(0, 0, 0, 0, 0)

    def _autocast(self) -> contextlib.AbstractContextManager:
        return self.plain._autocast()

    def propagate(self, frames: np.ndarray, keyframe_position: int, boxes: np.ndarray) -> np.ndarray:
        request = PropagationRequest(0, int(keyframe_position), np.asarray(boxes, dtype=np.float32))
        return self.propagate_many({0: frames}, [request])[0]

    def propagate_frames(
        self, frames: np.ndarray, keyframe_position: int, boxes: np.ndarray
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Frame by frame, one clip: the plain predictor's (nothing to share across requests)."""
        return self.plain.propagate_frames(frames, keyframe_position, boxes)

    @torch.inference_mode()
    def encode_frames(self, frames: np.ndarray) -> FrameFeatures:
        """The image features of (T, H, W, 3) uint8 frames, `encode_batch_size` frames per encoder call."""
        return self._encode({0: np.asarray(frames)})[0]

    def _encode(self, videos: Mapping[Hashable, np.ndarray]) -> dict[Hashable, FrameFeatures]:
        predictor = self.predictor
        keys = list(videos)
        # the frames of each video in turn, `preprocess_threads` at once (one video alone keeps every thread busy)
        inputs = [sam2_input_frames(videos[k], predictor.image_size, self.preprocess_threads) for k in keys]
        features = {}
        with self._autocast():
            for key, images in zip(keys, inputs, strict=True):
                images = images.to(predictor.device)
                chunks = [
                    predictor.forward_image(images[start : start + self.encode_batch_size])
                    for start in range(0, len(images), self.encode_batch_size)
                ]
                height, width = videos[key].shape[1:3]
                features[key] = FrameFeatures(
                    fpn=[
                        torch.cat([c["backbone_fpn"][lv] for c in chunks])
                        for lv in range(len(chunks[0]["backbone_fpn"]))
                    ],
                    pos=[p[:1] for p in chunks[0]["vision_pos_enc"]],
                    height=int(height),
                    width=int(width),
                )
        return features

    @torch.inference_mode()
    def propagate_many(
        self, videos: Mapping[Hashable, np.ndarray], requests: Sequence[PropagationRequest]
    ) -> list[np.ndarray]:
        """(T, H, W) bool masks per request (OR over its boxes' objects, logits > 0), in request order; the
        frames of each video are encoded once and identical objects are tracked once."""
        videos = {key: np.asarray(frames) for key, frames in videos.items()}
        requests = [
            PropagationRequest(
                r.video, int(r.keyframe_position), np.asarray(r.boxes, np.float32).reshape(-1, 4)
            )
            for r in requests
        ]
        for request in requests:
            check_propagation_inputs(videos[request.video], request.keyframe_position, request.boxes)
        if couples_objects(self.predictor):
            self.last_stats = PropagationStats(len(requests), 0, 0, 0, 0)
            return [self.plain.propagate(videos[r.video], r.keyframe_position, r.boxes) for r in requests]

        objects: dict[tuple, int] = {}  # (video, keyframe, box bytes) -> object index
        request_objects = []
        for request in requests:
            ids = [
                objects.setdefault((request.video, request.keyframe_position, box.tobytes()), len(objects))
                for box in request.boxes
            ]
            request_objects.append(ids)
        used = sorted({key[0] for key in objects}, key=lambda k: list(videos).index(k))
        features = self._encode({key: videos[key] for key in used})
        object_masks, track_calls = self._track_all(objects, features)

        results = []
        for request, ids in zip(requests, request_objects, strict=True):
            num_frames, height, width = videos[request.video].shape[:3]
            if not ids:
                results.append(np.zeros((num_frames, height, width), dtype=bool))
                continue
            results.append(torch.stack([object_masks[i] for i in ids]).any(dim=0).cpu().numpy())
        self.last_stats = PropagationStats(
            len(requests), len(used), sum(f.num_frames for f in features.values()), len(objects), track_calls
        )
        return results

    def _track_all(
        self, objects: Mapping[tuple, int], features: Mapping[Hashable, FrameFeatures]
    ) -> tuple[dict[int, torch.Tensor], int]:
        """(T, H, W) bool mask of every object, on the device; objects grouped by (clip length, keyframe)."""
        buckets: dict[tuple[int, int], list[tuple[Hashable, np.ndarray, int]]] = {}
        for (video, keyframe, box_bytes), index in objects.items():
            box = np.frombuffer(box_bytes, dtype=np.float32)
            buckets.setdefault((features[video].num_frames, keyframe), []).append((video, box, index))
        masks: dict[int, torch.Tensor] = {}
        calls = 0
        with self._autocast():
            for (_, keyframe), members in buckets.items():
                for start in range(0, len(members), self.max_objects_per_batch):
                    chunk = members[start : start + self.max_objects_per_batch]
                    logits = self._track_batch(
                        [features[v] for v, _, _ in chunk], keyframe, [b for _, b, _ in chunk]
                    )
                    calls += logits.shape[1]
                    masks.update(self._to_video_masks(chunk, features, logits))
        return masks, calls

    def _to_video_masks(
        self,
        chunk: list[tuple[Hashable, np.ndarray, int]],
        features: Mapping[Hashable, FrameFeatures],
        logits: torch.Tensor,
    ) -> dict[int, torch.Tensor]:
        """`_get_orig_video_res_output` + `logits > 0` per object: logits (B, T, 1, h, w) low-res."""
        out = {}
        by_size: dict[tuple[int, int], list[int]] = {}
        for row, (video, _, _) in enumerate(chunk):
            by_size.setdefault((features[video].height, features[video].width), []).append(row)
        for size, rows in by_size.items():
            picked = logits[rows]  # (b, T, 1, h, w)
            b, t = picked.shape[:2]
            video_res = F.interpolate(picked.flatten(0, 1), size=size, mode="bilinear", align_corners=False)
            binary = (video_res[:, 0] > 0).view(b, t, *size)
            for row, mask in zip(rows, binary, strict=True):
                out[chunk[row][2]] = mask
        return out

    def _frame_inputs(self, videos: list[FrameFeatures], frame_idx: int):
        """(vision_feats, vision_pos_embeds, feat_sizes) of `frame_idx` for a batch of objects, as
        `_get_image_feature` + `_prepare_backbone_features` give them (HW, B, C)."""
        batch = len(videos)
        if all(v is videos[0] for v in videos):
            fpn = [x[frame_idx : frame_idx + 1].expand(batch, -1, -1, -1) for x in videos[0].fpn]
        else:
            fpn = [
                torch.stack([v.fpn[level][frame_idx] for v in videos]) for level in range(len(videos[0].fpn))
            ]
        pos = [p.expand(batch, -1, -1, -1) for p in videos[0].pos]
        _, feats, pos_embeds, sizes = self.predictor._prepare_backbone_features(
            {"backbone_fpn": fpn, "vision_pos_enc": pos}
        )
        return feats, pos_embeds, sizes

    def _compact(self, out: dict[str, Any], constants: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor]:
        """`_run_single_frame_inference`'s stored output (bf16 memory, holes filled) and its mask logits."""
        predictor = self.predictor
        maskmem = out["maskmem_features"]
        pred_masks = out["pred_masks"]
        if predictor.fill_hole_area > 0:
            pred_masks = fill_holes_in_mask_scores(pred_masks, predictor.fill_hole_area)
        compact = {
            "maskmem_features": None if maskmem is None else maskmem.to(torch.bfloat16),
            "maskmem_pos_enc": predictor._get_maskmem_pos_enc({"constants": constants}, out),
            "pred_masks": pred_masks,
            "obj_ptr": out["obj_ptr"],
            "object_score_logits": out["object_score_logits"],
        }
        return compact, pred_masks

    def _track_batch(
        self, videos: list[FrameFeatures], keyframe: int, boxes: list[np.ndarray]
    ) -> torch.Tensor:
        """Low-res mask logits (B, T, 1, h, w) of B objects, each boxed on frame `keyframe` of its video
        (all videos T frames long): the predictor's add_new_points_or_box, preflight, and propagate_in_video
        forward then backward, for all B objects in each call."""
        predictor = self.predictor
        device = predictor.device
        num_frames = videos[0].num_frames
        sizes = torch.tensor([[v.width, v.height] for v in videos])  # int64, as in add_new_points_or_box
        coords = torch.from_numpy(np.stack(boxes)).reshape(-1, 2, 2) / sizes[:, None, :]
        point_inputs = {
            "point_coords": (coords * predictor.image_size).to(device),
            "point_labels": torch.tensor([[2, 3]], dtype=torch.int32).expand(len(boxes), 2).to(device),
        }
        constants: dict[str, Any] = {}
        output_dict: dict[str, dict[int, Any]] = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
        logits: list[torch.Tensor | None] = [None] * num_frames

        feats, pos_embeds, feat_sizes = self._frame_inputs(videos, keyframe)
        out = predictor.track_step(
            frame_idx=keyframe,
            is_init_cond_frame=True,
            current_vision_feats=feats,
            current_vision_pos_embeds=pos_embeds,
            feat_sizes=feat_sizes,
            point_inputs=point_inputs,
            mask_inputs=None,
            output_dict=output_dict,
            num_frames=num_frames,
            track_in_reverse=False,
            run_mem_encoder=False,
        )
        cond, logits[keyframe] = self._compact(out, constants)
        # propagate_in_video_preflight: the memory of the prompted frame, from its upsampled mask logits.
        high_res = F.interpolate(
            cond["pred_masks"].to(device),
            size=(predictor.image_size, predictor.image_size),
            mode="bilinear",
            align_corners=False,
        )
        maskmem, maskmem_pos = predictor._encode_new_memory(
            current_vision_feats=feats,
            feat_sizes=feat_sizes,
            pred_masks_high_res=high_res,
            object_score_logits=cond["object_score_logits"],
            is_mask_from_pts=True,
        )
        cond["maskmem_features"] = maskmem.to(torch.bfloat16)
        cond["maskmem_pos_enc"] = predictor._get_maskmem_pos_enc(
            {"constants": constants}, {"maskmem_pos_enc": maskmem_pos}
        )
        output_dict["cond_frame_outputs"][keyframe] = cond

        forward = [(t, False) for t in range(keyframe + 1, num_frames)]
        backward = [(t, True) for t in range(keyframe - 1, -1, -1)]
        for frame_idx, reverse in forward + backward:
            feats, pos_embeds, feat_sizes = self._frame_inputs(videos, frame_idx)
            out = predictor.track_step(
                frame_idx=frame_idx,
                is_init_cond_frame=False,
                current_vision_feats=feats,
                current_vision_pos_embeds=pos_embeds,
                feat_sizes=feat_sizes,
                point_inputs=None,
                mask_inputs=None,
                output_dict=output_dict,
                num_frames=num_frames,
                track_in_reverse=reverse,
                run_mem_encoder=True,
            )
            output_dict["non_cond_frame_outputs"][frame_idx], logits[frame_idx] = self._compact(
                out, constants
            )
        return torch.stack(logits, dim=1).float()
