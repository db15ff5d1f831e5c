"""`contiguous_slices` on hand-worked cases: consecutive, covering, sizes differing by at most one."""

from __future__ import annotations

import pytest

from veason_ray.contiguous_split import contiguous_slices


@pytest.mark.parametrize(
    ("count", "parts", "sizes"),
    [(10, 3, [4, 3, 3]), (9, 3, [3, 3, 3]), (2, 4, [1, 1, 0, 0]), (0, 2, [0, 0]), (7, 1, [7])],
)
def test_slices_are_consecutive_and_cover_every_item(count, parts, sizes):
    slices = contiguous_slices(count, parts)
    assert [s.stop - s.start for s in slices] == sizes
    assert [i for s in slices for i in range(count)[s]] == list(range(count))


def test_no_parts_is_refused():
    with pytest.raises(ValueError, match="parts"):
        contiguous_slices(3, 0)
