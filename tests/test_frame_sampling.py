"""Training and evaluation frame sampling."""

from __future__ import annotations

import numpy as np
import pytest

from veason_ray.frame_sampling import (
    sample_evaluation_frames,
    sample_training_frames,
    spread_frames,
    top_area_frames,
)


def test_top_area_frames_largest_first_ties_to_earlier():
    assert top_area_frames([5, 9, 9, 0, 7, 9, 1], 5) == [1, 2, 5, 4, 0]
    assert top_area_frames([3, 1], 5) == [0, 1]


def test_spread_frames_hand_worked():
    # 60 frames in 6 segments of 10: every segment gives the frame at the keyframe's offset within its own.
    assert spread_frames(60, 6, 17) == (7, 17, 27, 37, 47, 57)
    assert spread_frames(60, 6, 0) == (0, 10, 20, 30, 40, 50)
    assert spread_frames(16, 4, 6) == (2, 6, 10, 14)
    assert spread_frames(10, 4, 9) == (
        1,
        4,
        6,
        9,
    )  # stride 2.5: 9 + floor(-7.5), 9 + floor(-5), 9 + floor(-2.5)
    # 7 frames, 6 wanted: segments {0,1}, {2}, {3}, {4}, {5}, {6}.
    assert spread_frames(7, 6, 1) == (1, 2, 3, 4, 5, 6)
    assert spread_frames(4, 6, 2) == (0, 1, 2, 3)  # short video: every frame
    with pytest.raises(ValueError):
        spread_frames(10, 6, 10)


def test_spread_frames_always_exactly_n_distinct_sorted_with_keyframe():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        length = int(rng.integers(1, 400))
        n = int(rng.integers(1, 12))
        keyframe = int(rng.integers(0, length))
        frames = spread_frames(length, n, keyframe)
        assert len(frames) == min(n, length)
        assert list(frames) == sorted(set(frames))
        assert keyframe in frames and 0 <= frames[0] and frames[-1] < length
        if (
            length > n
        ):  # evenly spaced: every gap is floor or ceil of L / N, so the keyframe's is no different
            assert set(np.diff(frames)) <= {length // n, -(-length // n)}


def test_spread_frames_do_not_give_the_keyframe_away():
    """Whatever the keyframe, the frames are one grid through it: the same sets of timestamps come with the
    keyframe in every slot (with segment middles, 16 frames in 4, the keyframe was the one off 1, 5, 9, 13).
    Exact when N divides L (the synthetic world's videos); otherwise the gaps are L / N rounded either way."""
    for length, n in ((16, 4), (60, 6), (24, 8)):
        by_frames: dict[tuple[int, ...], set[int]] = {}
        for keyframe in range(length):
            frames = spread_frames(length, n, keyframe)
            by_frames.setdefault(frames, set()).add(frames.index(keyframe))
        assert all(slots == set(range(n)) for slots in by_frames.values()), (length, n)


def test_training_sampling_is_deterministic_and_draws_from_top_five():
    areas = np.zeros(100, dtype=int)
    areas[[10, 30, 50, 70, 90]] = [50, 40, 30, 20, 10]
    areas[[20, 40]] = 5
    first = sample_training_frames(areas, np.random.default_rng(42))
    again = sample_training_frames(areas, np.random.default_rng(42))
    assert first == again
    keyframes = {sample_training_frames(areas, np.random.default_rng(seed)).keyframe for seed in range(200)}
    assert keyframes == {10, 30, 50, 70, 90}
    sample = sample_training_frames(areas, np.random.default_rng(1), num_frames=8)
    assert len(sample.frame_indices) == 8
    assert sample.frame_indices[sample.keyframe_position] == sample.keyframe
    with pytest.raises(ValueError):
        sample_training_frames([], np.random.default_rng(0))


def test_evaluation_sampling_is_release_linspace():
    assert sample_evaluation_frames(100) == (0, 14, 28, 42, 56, 70, 84, 99)
    assert sample_evaluation_frames(100) == tuple(np.linspace(0, 99, 8, dtype=int).tolist())
    assert sample_evaluation_frames(5) == (0, 1, 2, 3, 4)
    assert sample_evaluation_frames(9, 8) == (0, 1, 2, 3, 4, 5, 6, 8)
    assert len(set(sample_evaluation_frames(37, 12))) == 12
