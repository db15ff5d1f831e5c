"""Which expressions of a split a run uses: the wanted types, optionally a seeded sample spread over the split."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from veason_ray.datasets.records import ExpressionRecord


def select_expressions(
    records: Sequence[ExpressionRecord], types: Sequence[int], limit: int, seed: int
) -> list[ExpressionRecord]:
    """Expressions of the wanted types (records without a type are kept); with a limit > 0, a seeded sample
    spread over the split, in dataset order."""
    chosen = [r for r in records if r.type_id is None or r.type_id in types]
    if 0 < limit < len(chosen):
        picked = np.random.default_rng(seed).choice(len(chosen), size=limit, replace=False)
        chosen = [chosen[i] for i in sorted(picked)]
    return chosen
