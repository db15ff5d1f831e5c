"""Stratified sampling of the CoT training subset (docs/method.md section 6).

The expressions are split into strata {referring, reasoning} x {single, multi} (multi = more than one target
object). Each stratum's quota is the target size times the product of the two marginal shares of the pool
(share of its type times share of its instance count), rounded by largest remainder so the quotas add up to the
target exactly; a stratum gives at most what it has. The shortfall of small strata is then topped up by a
uniform draw from everything not yet picked, so the selection has exactly min(target, pool) expressions.
Every draw comes from one generator seeded by ``seed`` (ours), so a seed gives the same subset every time.

No-target expressions (ReVOS type_id 2) are excluded from the pool and from the top-up: they have no box to
teach, the CoT answer format needs a keyframe and at least one box, and the release's strata name only
referring and reasoning. They are counted in the tables (``excluded``) so nothing disappears unseen.
Datasets without types (MeViS, ReasonVOS) have one type stratum, ``untyped``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from veason_ray.datasets.records import TYPE_NAMES, TYPE_NO_TARGET, ExpressionRecord

UNTYPED = "untyped"
INSTANCES = ("single", "multi")
DEFAULT_TARGET_SIZE = 10_000

Stratum = tuple[str, str]  # (type name, "single" | "multi")


def stratum_of(record: ExpressionRecord) -> Stratum | None:
    """(type name, instance) of an expression; None for no-target expressions (excluded)."""
    if record.type_id == TYPE_NO_TARGET:
        return None
    type_name = UNTYPED if record.type_id is None else TYPE_NAMES[record.type_id]
    return type_name, "multi" if record.is_multi_instance else "single"


@dataclass(frozen=True)
class StratifiedSelection:
    """The selected expressions (in input order) and the distribution tables.

    ``before``: pool size per stratum; ``quotas``: product-of-marginals quota per stratum; ``after``: selected
    per stratum (quota draw plus top-up); ``excluded``: no-target expressions left out of the pool."""

    selected: tuple[ExpressionRecord, ...]
    before: dict[Stratum, int]
    quotas: dict[Stratum, int]
    after: dict[Stratum, int]
    excluded: int
    target_size: int
    seed: int

    def table(self) -> str:
        """A text table of the distribution before and after, with shares in percent."""
        total_before, total_after = sum(self.before.values()), sum(self.after.values())
        lines = [f"{'stratum':<22}{'before':>8}{'%':>7}{'quota':>8}{'after':>8}{'%':>7}"]
        for stratum in self.before:
            b, a = self.before[stratum], self.after[stratum]
            lines.append(
                f"{stratum[0] + ' / ' + stratum[1]:<22}{b:>8}{_pct(b, total_before):>7}"
                f"{self.quotas[stratum]:>8}{a:>8}{_pct(a, total_after):>7}"
            )
        lines.append(f"{'total':<22}{total_before:>8}{'':>7}{sum(self.quotas.values()):>8}{total_after:>8}")
        lines.append(f"{'excluded (no target)':<22}{self.excluded:>8}")
        return "\n".join(lines)


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}" if whole else "-"


def product_of_marginals_quotas(counts: dict[Stratum, int], size: int) -> dict[Stratum, int]:
    """Quota per stratum: ``size`` x share(type) x share(instance) of the pool ``counts``, integers adding up to
    ``size`` exactly (largest remainder; ties to the stratum listed first)."""
    total = sum(counts.values())
    if total == 0 or size <= 0:
        return dict.fromkeys(counts, 0)
    type_share: dict[str, float] = {}
    instance_share: dict[str, float] = {}
    for (type_name, instance), n in counts.items():
        type_share[type_name] = type_share.get(type_name, 0.0) + n / total
        instance_share[instance] = instance_share.get(instance, 0.0) + n / total
    exact = {s: size * type_share[s[0]] * instance_share[s[1]] for s in counts}
    quotas = {s: int(np.floor(q)) for s, q in exact.items()}
    order = sorted(counts, key=lambda s: -(exact[s] - quotas[s]))  # stable: ties keep listing order
    for stratum in order[: size - sum(quotas.values())]:
        quotas[stratum] += 1
    return quotas


def stratified_sample(
    records: Sequence[ExpressionRecord], target_size: int = DEFAULT_TARGET_SIZE, seed: int = 0
) -> StratifiedSelection:
    """Select min(target_size, pool) expressions: product-of-marginals quotas per stratum, then a uniform
    top-up from the rest of the pool (see the module docstring). The result keeps the input order."""
    if target_size < 1:
        raise ValueError(f"sample.target_size must be >= 1, got {target_size}")
    strata: dict[Stratum, list[int]] = {}
    excluded = 0
    for position, record in enumerate(records):
        stratum = stratum_of(record)
        if stratum is None:
            excluded += 1
            continue
        strata.setdefault(stratum, []).append(position)
    strata = dict(
        sorted(strata.items(), key=lambda item: (_type_rank(item[0][0]), INSTANCES.index(item[0][1])))
    )
    before = {s: len(p) for s, p in strata.items()}
    size = min(target_size, sum(before.values()))
    quotas = product_of_marginals_quotas(before, size)
    rng = np.random.default_rng(seed)
    picked: set[int] = set()
    for stratum, positions in strata.items():
        take = min(quotas[stratum], len(positions))
        picked.update(int(i) for i in rng.choice(positions, size=take, replace=False))
    rest = sorted(i for positions in strata.values() for i in positions if i not in picked)
    picked.update(int(i) for i in rng.choice(rest, size=size - len(picked), replace=False))
    selected = tuple(records[i] for i in sorted(picked))
    after = dict.fromkeys(strata, 0)
    for record in selected:
        after[stratum_of(record)] += 1
    return StratifiedSelection(selected, before, quotas, after, excluded, target_size, seed)


def _type_rank(type_name: str) -> int:
    names = [TYPE_NAMES[t] for t in sorted(TYPE_NAMES)] + [UNTYPED]
    return names.index(type_name)
