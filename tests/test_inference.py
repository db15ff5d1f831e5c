"""The inference API (veason_ray/inference.py) on the synthetic world: the policy's view, answers read for
segmentation, masks through the colour tracker, and the whole chain with the tiny policy in process."""

from __future__ import annotations

import re

import numpy as np
import pytest

from veason_ray.datasets import open_dataset
from veason_ray.evaluation import oracle_answer
from veason_ray.frame_sampling import sample_evaluation_frames
from veason_ray.inference import (
    VideoSegmenter,
    locate_answer,
    policy_input,
    policy_view,
    propagate_answers,
)
from veason_ray.metrics import score_expression
from veason_ray.models.colour_propagator import ColourTrackPropagator
from veason_ray.prompts import answer_regex, render_answer
from veason_ray.records import Sample
from veason_ray.sample_building import read_ground_truth


def test_policy_view_is_the_evaluation_sampling_resized():
    frames = np.random.default_rng(0).integers(0, 256, (30, 48, 64, 3), dtype=np.uint8)
    indices, view = policy_view(frames, num_frames=8, frame_size=56)
    assert indices == sample_evaluation_frames(30, 8) and indices[0] == 0 and indices[-1] == 29
    assert view.shape == (8, 56, 56, 3) and view.dtype == np.uint8
    item = policy_input(frames, "the red shape", num_frames=8, frame_size=56)
    assert item.frame_indices == indices and np.array_equal(item.frames, view)
    user = item.messages()[1]["content"]
    assert [c["text"] for c in user if c["type"] == "text"][:2] == ["(0s)", f"({indices[1]}s)"]
    with pytest.raises(ValueError, match="query is empty"):
        policy_input(frames, "  ")
    with pytest.raises(ValueError, match="uint8"):
        policy_view(frames.astype(np.float32))


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("no tags at all", "unparsable answer: no_answer_block"),
        ('<think>x</think><answer>{"keyframe_timestamp": 40, "bbox_2d_list": [[1, 2, 3, 4]]}</answer>', "keyframe 40"),
        ('<think>x</think><answer>{"keyframe_timestamp": 3, "bbox_2d_list": []}</answer>', "no boxes"),
    ],
)  # fmt: skip
def test_unusable_answers_say_why_and_never_raise(text, reason):
    answer = locate_answer(text, num_video_frames=20, height=120, width=160)
    assert not answer.usable and answer.empty_reason.startswith(reason)
    assert answer.boxes.shape == (0, 4)
    masks = propagate_answers(
        {0: np.zeros((20, 120, 160, 3), np.uint8)}, [(0, answer)], ColourTrackPropagator()
    )
    assert masks[0].shape == (20, 120, 160) and not masks[0].any()


def test_boxes_are_scaled_to_the_video_and_clipped():
    text = render_answer("the shape on the left", 5, [[0, 0, 280, 560], [500, 500, 600, 600]])
    answer = locate_answer(text, num_video_frames=10, height=120, width=160)
    assert answer.usable and answer.keyframe == 5 and answer.reasoning == "the shape on the left"
    np.testing.assert_allclose(answer.boxes, [[0, 0, 80, 119], [500 * 160 / 560, 500 * 120 / 560, 159, 119]])
    np.testing.assert_allclose(answer.boxes_560[1], [500, 500, 600, 600])


def test_ground_truth_answers_segment_the_target(synthetic_revos):
    dataset = open_dataset("revos", str(synthetic_revos), "valid")
    propagator = ColourTrackPropagator()
    scores = []
    for record in list(dataset.expressions())[:6]:
        if record.type_id == 2:
            continue
        frames = dataset.read_frames(record.video)
        indices, view = policy_view(frames, num_frames=4)
        gt_masks, gt_boxes = read_ground_truth(dataset, record, indices)
        sample = Sample(record, indices, None, view, gt_masks, gt_boxes, frames.shape[1:3], len(frames))
        answer = locate_answer(oracle_answer(sample), len(frames), *frames.shape[1:3])
        masks = propagate_answers({record.video: frames}, [(record.video, answer)], propagator)[0]
        scores.append(score_expression(masks, dataset.gt_masks(record)).jf)
    assert scores and np.mean(scores) > 0.9


def test_answer_regex_accepts_the_schema_and_bounds_it():
    pattern = re.compile(answer_regex([0, 5, 11], max_think_chars=20, max_boxes=2))
    assert pattern.fullmatch(render_answer("short thought", 5, [[1, 2, 300, 559]]))
    assert pattern.fullmatch(render_answer("", 11, [[0, 0, 1, 1], [10, 20, 30, 40]]))
    assert not pattern.fullmatch(render_answer("short thought", 4, [[1, 2, 3, 4]]))  # not a prompt timestamp
    assert not pattern.fullmatch(render_answer("x" * 21, 5, [[1, 2, 3, 4]]))  # think too long
    assert not pattern.fullmatch(render_answer("t", 5, [[1, 2, 3, 560]]))  # outside the 560 frame
    assert not pattern.fullmatch(render_answer("t", 5, [[1, 2, 3, 4]] * 3))  # too many boxes
    assert not pattern.fullmatch(render_answer("t", 5, []))  # no box


def test_segmenter_runs_the_whole_chain_with_the_tiny_policy(tmp_path, synthetic_revos):
    from veason_ray.models.hf_policy import GenerationSettings, HFAnswerGenerator, HFPolicy
    from veason_ray.models.loading import load_policy
    from veason_ray.models.tiny_qwen import write_tiny_qwen

    model, processor = load_policy(
        str(write_tiny_qwen(tmp_path / "tiny", seed=0)), dtype="float32", device="cpu"
    )
    generator = HFAnswerGenerator(
        HFPolicy(model, processor), GenerationSettings(max_new_tokens=8, temperature=0)
    )
    segmenter = VideoSegmenter(generator, ColourTrackPropagator(), num_frames=3, frame_size=112)
    dataset = open_dataset("revos", str(synthetic_revos), "valid")
    videos = [dataset.read_frames(name) for name in dataset.video_names]
    results = segmenter.segment_many(videos, ["the red shape"] * len(videos))
    assert len(results) == len(videos)
    for frames, result in zip(videos, results, strict=True):
        assert result.masks.shape == frames.shape[:3] and result.frame_indices == sample_evaluation_frames(
            len(frames), 3
        )
        assert set(result.seconds) == {"prepare", "policy", "locate", "propagate"}
        assert result.answer and (result.empty_reason is None) == (
            result.keyframe is not None and len(result.boxes) > 0
        )
        doc = result.as_json()
        assert doc["query"] == "the red shape" and "masks" not in doc
    assert (
        results[0].answer == segmenter.segment(videos[0], "the red shape").answer
    )  # greedy: the same answer
