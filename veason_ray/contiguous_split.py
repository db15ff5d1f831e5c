"""Contiguous shares: `count` items cut into `parts` consecutive runs whose sizes differ by at most one. The
rollout pool's chunks of groups per engine and the learner's shares of sequences per rank (a group's responses
stay together where the sizes allow)."""

from __future__ import annotations


def contiguous_slices(count: int, parts: int) -> list[slice]:
    """`parts` consecutive slices of range(count); the first `count % parts` hold one item more (some are empty
    when count < parts)."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    base, extra = divmod(count, parts)
    bounds = [part * base + min(part, extra) for part in range(parts + 1)]
    return [slice(start, stop) for start, stop in zip(bounds, bounds[1:], strict=False)]
