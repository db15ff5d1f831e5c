"""Group-shared SAM2 propagation and group scoring on a random-init SAM2 at 256 px (CPU): masks identical to
the plain per-sample propagator (no tolerance), every frame encoded once, repeated objects tracked once, and
rewards identical to `score_response` with the plain propagator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reward_scenes import max_reward_difference, synthetic_group

from veason_ray.models.group_scoring import GroupInput, score_groups
from veason_ray.models.loading import load_sam2_video_predictor
from veason_ray.models.sam2_group import PropagationRequest, SAM2GroupPropagator
from veason_ray.models.sam2_propagator import SAM2MaskPropagator
from veason_ray.models.tiny_sam2 import write_tiny_sam2
from veason_ray.reward_scoring import score_response

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # sam2's hole filling without its CUDA op


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    return load_sam2_video_predictor(str(write_tiny_sam2(tmp_path_factory.mktemp("sam2"), seed=0)))


def _clip(seed: int, num_frames: int = 4, height: int = 72, width: int = 96) -> np.ndarray:
    """Two discs moving over dark noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    frames = rng.integers(0, 40, (num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        frames[t][(xx - (20 + 8 * t)) ** 2 + (yy - 36) ** 2 < 150] = (220, 60, 40)
        frames[t][(xx - 60) ** 2 + (yy - (10 + 5 * t)) ** 2 < 80] = (40, 200, 90)
    return frames


def _requests() -> tuple[dict[str, np.ndarray], list[PropagationRequest]]:
    """Two videos of different sizes; keyframes first, middle and last; 0, 1 and 2 boxes; a request that
    repeats another, and one whose box is also another request's first box."""
    videos = {"a": _clip(1), "b": _clip(2, height=64, width=64)}
    two = np.array([[8, 20, 44, 52], [50, 2, 70, 30]], dtype=np.float32)
    requests = [
        PropagationRequest("a", 1, two),
        PropagationRequest("a", 1, two[:1]),
        PropagationRequest("a", 3, two[1:]),
        PropagationRequest("a", 0, np.zeros((0, 4), dtype=np.float32)),
        PropagationRequest("b", 0, two[:1]),
        PropagationRequest("b", 2, two - 4),
        PropagationRequest("a", 1, two),
    ]
    return videos, requests


def test_group_masks_equal_per_sample_masks_exactly_one_object_per_track_call(predictor):
    videos, requests = _requests()
    plain = SAM2MaskPropagator(predictor)
    reference = [plain.propagate(videos[r.video], r.keyframe_position, r.boxes) for r in requests]
    assert sum(mask.any() for mask in reference) >= 4  # the random model does segment something
    group = SAM2GroupPropagator(predictor, encode_batch_size=3, max_objects_per_batch=1)
    masks = group.propagate_many(videos, requests)
    for got, want in zip(masks, reference, strict=True):
        assert got.shape == want.shape and got.dtype == bool
        np.testing.assert_array_equal(got, want)  # identical, no tolerance
    stats = group.last_stats
    assert (stats.requests, stats.videos, stats.frames_encoded) == (7, 2, 8)
    assert stats.objects == 6  # 9 boxes: the repeated request and the shared first box are tracked once


def test_batched_objects_differ_from_single_ones_by_rounding_only(predictor):
    """Batching objects changes only the summation order of CPU matrix products with few rows (the mask
    decoder's 8-9 tokens per object): logits agree to ~1e-6, so a mask can differ only at a pixel whose
    logit is that close to 0."""
    group = SAM2GroupPropagator(predictor)
    videos = {"a": _clip(1), "b": _clip(2)}
    features = group._encode(videos)
    boxes = [np.array(b, dtype=np.float32) for b in ([8, 20, 44, 52], [50, 2, 70, 30], [4, 4, 30, 30])]
    batch = [features["a"], features["a"], features["b"]]
    with torch.inference_mode():
        together = group._track_batch(batch, 1, boxes)
        alone = torch.cat([group._track_batch([f], 1, [b]) for f, b in zip(batch, boxes, strict=True)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-4)


def test_single_request_api_and_input_checks(predictor):
    frames = _clip(3, num_frames=3)
    box = np.array([[8, 20, 44, 52]], dtype=np.float32)
    group = SAM2GroupPropagator(predictor)
    np.testing.assert_array_equal(
        group.propagate(frames, 2, box), SAM2MaskPropagator(predictor).propagate(frames, 2, box)
    )
    with pytest.raises(ValueError, match="keyframe_position 3"):
        group.propagate(frames, 3, box)
    assert not group.propagate(frames, 0, np.zeros((0, 4), dtype=np.float32)).any()


def _reference_rewards(predictor, items: list[GroupInput]):
    plain = SAM2MaskPropagator(predictor)
    return [
        [
            score_response(
                rollout.text,
                frame_indices=item.group.sample.frame_indices,
                gt_masks=item.group.sample.gt_masks_560,
                gt_boxes=item.group.sample.gt_boxes_560,
                frames=item.frames,
                propagator=plain,
            )
            for rollout in item.rollouts
        ]
        for item in items
    ]


def test_score_groups_equals_score_response(predictor):
    items = []
    for group_id, objects in ((0, 1), (1, 2)):
        group, rollouts = synthetic_group(
            group_id, seed=10 + group_id, num_frames=4, num_objects=objects, answers=6
        )
        items.append(GroupInput(group, rollouts, group.sample.frames))
    reference = _reference_rewards(predictor, items)
    exact = score_groups(items, SAM2GroupPropagator(predictor, max_objects_per_batch=1))
    batched = score_groups(items, SAM2GroupPropagator(predictor))
    for item, want, got_exact, got_batched in zip(items, reference, exact, batched, strict=True):
        assert [s.rollout for s in got_exact] == list(item.rollouts)
        assert [s.reward for s in got_exact] == want  # identical
        assert max_reward_difference([s.reward for s in got_batched], want) <= 1e-4  # rounding (test above)
    rewards = [s.reward for s in exact[0]]
    assert rewards[1].parse_failure is not None and rewards[2].parts["keyframe"] == 0.0
    assert rewards[4] == rewards[0]
    assert any(r.parts["consistency"] > 0 for r in rewards)


def test_a_failing_batch_is_retried_request_by_request(predictor, monkeypatch):
    group, rollouts = synthetic_group(0, seed=3, num_frames=3, answers=3, edge_cases=False)
    propagator = SAM2GroupPropagator(predictor)
    original = propagator.propagate_many

    def fail_on_batches(videos, requests):
        if len(requests) > 1 or requests[0].keyframe_position == 0:
            raise RuntimeError("CUDA out of memory")
        return original(videos, requests)

    monkeypatch.setattr(propagator, "propagate_many", fail_on_batches)
    scored = score_groups([GroupInput(group, rollouts, group.sample.frames)], propagator)[0]
    positions = [
        group.sample.frame_indices.index(int(t.text.split('"keyframe_timestamp": ')[1].split(",")[0]))
        for t in rollouts
    ]
    for s, position in zip(scored, positions, strict=True):
        if position == 0:
            assert s.reward.parts["consistency"] == 0.0 and "CUDA out of memory" in s.reward.consistency_error
        else:
            assert s.reward.consistency_error is None


def test_frame_by_frame_propagation_gives_the_same_masks_in_propagation_order(predictor):
    """`propagate_frames` (what the Serve app streams) yields every frame once, the keyframe first, then
    forward, then backward, with exactly `propagate`'s masks, for SAM2 and for the seam's default."""
    from veason_ray.mask_propagation import MaskPropagator, propagation_order

    class Whole(MaskPropagator):  # the seam's default: a whole-clip propagator streamed afterwards
        def propagate(self, frames, keyframe_position, boxes):
            return SAM2MaskPropagator(predictor).propagate(frames, keyframe_position, boxes)

    frames = _clip(3, num_frames=6)
    boxes = np.array([[8, 20, 44, 52], [50, 2, 70, 30]], dtype=np.float32)
    assert propagation_order(6, 2) == [2, 3, 4, 5, 1, 0]
    for keyframe in (1, 5):  # a middle keyframe (both directions) and the last (backward only)
        want = SAM2MaskPropagator(predictor).propagate(frames, keyframe, boxes)
        assert want.any()
        for propagator in (SAM2MaskPropagator(predictor), SAM2GroupPropagator(predictor), Whole()):
            streamed = list(propagator.propagate_frames(frames, keyframe, boxes))
            assert [position for position, _ in streamed] == propagation_order(6, keyframe)
            got = np.stack([mask for _, mask in sorted(streamed, key=lambda item: item[0])])
            np.testing.assert_array_equal(got, want)
    empty = list(SAM2MaskPropagator(predictor).propagate_frames(frames, 1, np.zeros((0, 4), np.float32)))
    assert [p for p, _ in empty] == propagation_order(6, 1) and not any(m.any() for _, m in empty)
