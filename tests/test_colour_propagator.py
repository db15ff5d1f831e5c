"""The colour tracker (veason_ray/models/colour_propagator.py) on rendered synthetic scenes, against their modal
ground truth: in the learning benchmark's view (4 training-sampled frames, JPEG, resized to 560) and in the
evaluation's (every frame at 320x240); wrong boxes, empty inputs, the reward through `score_groups` and the
reward worker, and the `reward.propagator` switch."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from actors.reward import SAM2RewardWorker
from veason_ray.boxes import ground_truth_boxes_560, mask_box, resize_masks_nearest
from veason_ray.config import RewardConfig
from veason_ray.config_loading import ConfigError, load_config
from veason_ray.frame_sampling import sample_training_frames
from veason_ray.frames import resize_frames
from veason_ray.metrics import j_and_f_per_frame, jaccard_per_frame
from veason_ray.models.colour_propagator import ColourTrackPropagator
from veason_ray.models.group_scoring import GroupInput, score_groups
from veason_ray.models.propagator_choice import build_mask_propagator
from veason_ray.prompts import render_answer
from veason_ray.records import ExpressionRecord, PromptGroup, Rollout, Sample
from veason_ray.reward_scoring import score_response
from veason_ray.synth.expressions import NO_TARGET
from veason_ray.synth.world import Scene, WorldConfig
from veason_ray.synth.writer import JPEG_QUALITY, simulate_video

SEED = 0
VIDEOS = range(12)  # 12 scenes: 61 distinct expression targets, 26 of them multi-instance, 54 moving
SAMPLED_FRAMES = 4  # as configs/learning-1gpu.yaml


@dataclass(frozen=True)
class Case:
    """One expression target of a rendered scene: the frames as the dataset stores them (JPEG-decoded, the
    scene's size) and the target objects' indices."""

    video: int
    scene: Scene
    frames: np.ndarray
    targets: tuple[int, ...]

    def others(self, frame: int) -> list[int]:
        """Objects that are not targets and are visible on `frame`."""
        return [
            i
            for i in range(len(self.scene.objects))
            if i not in self.targets and self.scene.modal[i, frame].any()
        ]


@dataclass(frozen=True)
class View:
    """What a propagator is given and scored against: frames, the keyframe position, GT union masks at the
    frames' size, and the (K, 4) boxes of any objects on the keyframe in the frames' pixels (`boxes_of`: the GT
    boxes of 560 space, or tight pixel boxes at the scene's own size)."""

    frames: np.ndarray
    keyframe_position: int
    frame_indices: tuple[int, ...]
    gt: np.ndarray
    case: Case

    def boxes_of(self, objects: list[int] | tuple[int, ...]) -> np.ndarray:
        masks = self.case.scene.modal[list(objects), self.frame_indices[self.keyframe_position]]
        if self.frames.shape[1:3] == (560, 560):
            return ground_truth_boxes_560(masks).astype(np.float32)
        boxes = [mask_box(mask) for mask in masks if mask.any()]  # an object absent there has no box
        return np.array(boxes, dtype=np.float32).reshape(-1, 4)


def _jpeg_round_trip(image: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


@pytest.fixture(scope="module")
def cases() -> list[Case]:
    out = []
    for video in VIDEOS:
        scene, expressions = simulate_video(SEED, video, WorldConfig())
        frames = np.stack([_jpeg_round_trip(scene.render(t)) for t in range(scene.num_frames)])
        targets = sorted({e.targets for e in expressions if e.type_id != NO_TARGET})
        out += [Case(video, scene, frames, t) for t in targets]
    return out


def learning_view(case: Case) -> View:
    """4 frames drawn as in training (keyframe among the largest-GT frames), resized to 560 like the policy's."""
    union = case.scene.modal[list(case.targets)].any(axis=0)
    rng = np.random.default_rng([SEED, case.video, *case.targets])
    drawn = sample_training_frames(union.sum(axis=(1, 2)), rng, SAMPLED_FRAMES)
    indices = list(drawn.frame_indices)
    return View(
        resize_frames(case.frames[indices]),
        drawn.keyframe_position,
        drawn.frame_indices,
        resize_masks_nearest(union[indices], 560),
        case,
    )


def evaluation_view(case: Case) -> View:
    """Every frame at the scene's own size, keyframe = the frame with the largest GT (as evaluation sees it)."""
    union = case.scene.modal[list(case.targets)].any(axis=0)
    keyframe = int(np.argmax(union.sum(axis=(1, 2))))
    return View(case.frames, keyframe, tuple(range(len(case.frames))), union, case)


def _jf(pred: np.ndarray, gt: np.ndarray) -> float:
    j, f = j_and_f_per_frame(pred, gt)
    return float((j.mean() + f.mean()) / 2)


@pytest.mark.parametrize(
    ("make_view", "mean_bar"),
    [(learning_view, 0.9), (evaluation_view, 0.92)],
    ids=["sampled-560", "every-frame"],
)
def test_ground_truth_boxes_follow_their_targets(cases, make_view, mean_bar):
    # Measured (12 scenes, 61 targets): J&F mean 0.949 on the sampled frames (moving targets 0.945, 92% of
    # targets >= 0.8), 0.965 on every frame (moving 0.960, 95% >= 0.8); other seeds give 0.90-0.93 and
    # 0.94-0.95. The misses are identity swaps between same-coloured objects (module docstring, limits); random
    # SAM2 scored 0.055 here. The bars leave room for JPEG/resize differences across library versions.
    propagator = ColourTrackPropagator()
    scores = []
    for case in cases:
        view = make_view(case)
        pred = propagator.propagate(view.frames, view.keyframe_position, view.boxes_of(case.targets))
        scores.append(_jf(pred, view.gt))
    scores = np.array(scores)
    moving = np.array([any(case.scene.objects[i].motion != "static" for i in case.targets) for case in cases])
    assert len(scores) >= 50 and moving.sum() >= 40
    assert scores.mean() >= mean_bar
    assert scores[moving].mean() >= mean_bar
    assert np.mean(scores >= 0.8) >= 0.85


def test_a_box_on_another_object_misses_the_target(cases):
    # Measured: mean J 0.022 over 166 (target, other object) pairs; J counts 1 on frames where both are empty.
    propagator = ColourTrackPropagator()
    j_scores = []
    for case in cases:
        view = learning_view(case)
        colours = {case.scene.objects[i].colour for i in case.targets}
        for other in case.others(view.frame_indices[view.keyframe_position]):
            pred = propagator.propagate(view.frames, view.keyframe_position, view.boxes_of([other]))
            j_scores.append(float(jaccard_per_frame(pred, view.gt).mean()))
            if case.scene.objects[other].colour not in colours:  # another colour: at most edge pixels
                # measured worst 3.4% (video 0: where the two shapes touch, resizing blends their edges)
                assert (pred & view.gt).sum() <= 0.05 * max(view.gt.sum(), 1)
    assert len(j_scores) >= 100
    assert np.mean(j_scores) < 0.2


def test_no_box_or_a_box_on_the_background_gives_empty_masks(cases):
    view = learning_view(cases[0])
    propagator = ColourTrackPropagator()
    empty = propagator.propagate(view.frames, view.keyframe_position, np.zeros((0, 4), np.float32))
    assert empty.shape == view.gt.shape and not empty.any()
    keyframe = view.frames[view.keyframe_position]
    foreground = np.abs(keyframe.astype(int) - keyframe[0, 0].astype(int)).sum(axis=-1) > 60
    ys, xs = np.nonzero(~foreground[:40, :40])  # a corner patch of plain background
    assert len(ys)
    corner = np.array([[xs.min(), ys.min(), xs.min() + 5, ys.min() + 5]], np.float32)
    assert not foreground[ys.min() : ys.min() + 6, xs.min() : xs.min() + 6].any()
    assert not propagator.propagate(view.frames, view.keyframe_position, corner).any()
    outside = np.array([[600, 600, 700, 700], [10, 10, 5, 5]], np.float32)  # off the frame; x2 < x1
    assert not propagator.propagate(view.frames, view.keyframe_position, outside).any()


def test_two_boxes_give_the_union_of_their_masks(cases):
    propagator = ColourTrackPropagator()
    case = next(c for c in cases if len(c.others(0)) >= 2)
    view = evaluation_view(case)
    first, second = case.others(view.frame_indices[view.keyframe_position])[:2]
    both = propagator.propagate(view.frames, view.keyframe_position, view.boxes_of([first, second]))
    one = propagator.propagate(view.frames, view.keyframe_position, view.boxes_of([first]))
    two = propagator.propagate(view.frames, view.keyframe_position, view.boxes_of([second]))
    assert one.any() and two.any()
    np.testing.assert_array_equal(both, one | two)


def test_inputs_are_checked(cases):
    view = learning_view(cases[0])
    propagator = ColourTrackPropagator()
    with pytest.raises(ValueError, match="frames must be"):
        propagator.propagate(view.frames.astype(np.float32), 0, np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="keyframe_position"):
        propagator.propagate(view.frames, len(view.frames), np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="boxes must be"):
        propagator.propagate(view.frames, 0, np.zeros((1, 3), np.float32))


def _group(view: View, group_id: int) -> PromptGroup:
    case = view.case
    targets = case.targets
    record = ExpressionRecord(
        dataset="synthetic",
        split="train",
        video=f"v{case.video}",
        exp_id=str(group_id),
        expression="the target",
        type_id=0,
        obj_ids=targets,
        anno_ids=tuple(map(str, targets)),
    )
    modal = case.scene.modal[list(targets)]
    sample = Sample(
        record=record,
        frame_indices=view.frame_indices,
        keyframe=view.frame_indices[view.keyframe_position],
        frames=view.frames,
        gt_masks_560=view.gt,
        gt_boxes_560=[ground_truth_boxes_560(modal[:, t]) for t in view.frame_indices],
        original_size=(case.scene.height, case.scene.width),
        num_video_frames=case.scene.num_frames,
    )
    return PromptGroup(group_id, sample)


def test_score_groups_gives_the_right_object_the_higher_consistency(cases):
    propagator = ColourTrackPropagator()
    items = []
    for case in cases[::6]:
        view = learning_view(case)
        keyframe = view.frame_indices[view.keyframe_position]
        others = case.others(keyframe)
        if not others:
            continue
        texts = [
            render_answer("right", keyframe, view.boxes_of(case.targets)),
            render_answer("wrong", keyframe, view.boxes_of(others[:1])),
        ]
        group = _group(view, len(items))
        rollouts = [Rollout(group.group_id, i, text, [], [], "stop", 0) for i, text in enumerate(texts)]
        items.append(GroupInput(group, rollouts, view.frames))
    assert len(items) >= 5
    for item, scored in zip(items, score_groups(items, propagator), strict=True):
        right, wrong = (s.reward for s in scored)
        assert right.consistency_error is None and wrong.consistency_error is None
        assert right.parts["consistency"] > wrong.parts["consistency"]
        assert right.total > wrong.total
        sample = item.group.sample
        alone = score_response(
            item.rollouts[0].text,
            frame_indices=sample.frame_indices,
            gt_masks=sample.gt_masks_560,
            gt_boxes=sample.gt_boxes_560,
            frames=item.frames,
            propagator=propagator,
        )
        assert alone == right


def test_reward_propagator_switch():
    assert load_config(overrides=["reward.propagator=colour"]).reward.propagator == "colour"
    with pytest.raises(ConfigError, match=r"'reward\.propagator': expected one of 'sam2', 'colour'"):
        load_config(overrides=["reward.propagator=bogus"])
    assert isinstance(
        build_mask_propagator(RewardConfig(propagator="colour"), device="cpu"), ColourTrackPropagator
    )
    with pytest.raises(ValueError, match=r"reward\.propagator 'bogus': expected one of 'sam2', 'colour'"):
        build_mask_propagator(RewardConfig(propagator="bogus"), device="cpu")  # type: ignore[arg-type]


def test_the_reward_worker_with_the_colour_propagator_loads_no_sam2(cases):
    # The default reward.sam2.checkpoint is a download URL; with "colour" it is never fetched.
    worker = SAM2RewardWorker(RewardConfig(propagator="colour"))
    assert isinstance(worker.propagator, ColourTrackPropagator)
    view = learning_view(cases[0])
    keyframe = view.frame_indices[view.keyframe_position]
    texts = [
        render_answer("right", keyframe, view.boxes_of(cases[0].targets)),
        render_answer("wrong", keyframe, view.boxes_of(cases[0].others(keyframe)[:1])),
    ]
    group = _group(view, 0)
    right, wrong = worker.score(
        group, [Rollout(0, i, text, [], [], "stop", 0) for i, text in enumerate(texts)]
    )
    assert right.reward.parts["consistency"] > wrong.reward.parts["consistency"]
