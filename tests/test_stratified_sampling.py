"""Stratified sampling of the CoT subset and `veason sample`'s file round trip through our readers."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from pipelines.cli import main as veason
from pipelines.sample import filter_meta_document, meta_document_keys
from veason_ray.datasets import ExpressionRecord, open_dataset
from veason_ray.stratified_sampling import product_of_marginals_quotas, stratified_sample, stratum_of


def _record(i: int, type_id: int | None, objects: int) -> ExpressionRecord:
    return ExpressionRecord(
        "revos",
        "train",
        f"v{i // 10}",
        str(i),
        f"expression {i}",
        type_id,
        tuple(range(objects)),
        tuple(str(a) for a in range(objects)),
    )


def _pool(counts: dict[tuple[int, int], int], no_target: int = 0) -> list[ExpressionRecord]:
    """counts: {(type_id, number of objects): how many}; plus ``no_target`` type-2 expressions."""
    records, i = [], 0
    for (type_id, objects), n in counts.items():
        for _ in range(n):
            records.append(_record(i, type_id, objects))
            i += 1
    for _ in range(no_target):
        records.append(_record(i, 2, 1))
        i += 1
    return records


def test_quotas_are_the_product_of_the_marginals_and_add_up_exactly():
    # types 60/40, instances 75/25 -> 100 x: 45, 15, 30, 10 (already integers)
    counts = {
        ("referring", "single"): 50,
        ("referring", "multi"): 10,
        ("reasoning", "single"): 25,
        ("reasoning", "multi"): 15,
    }
    assert product_of_marginals_quotas(counts, 100) == {
        ("referring", "single"): 45,
        ("referring", "multi"): 15,
        ("reasoning", "single"): 30,
        ("reasoning", "multi"): 10,
    }
    # rounding: 7 x (0.6 x 0.75, 0.6 x 0.25, 0.4 x 0.75, 0.4 x 0.25) = 3.15, 1.05, 2.1, 0.7 -> 3, 1, 2, 1
    assert product_of_marginals_quotas(counts, 7) == {
        ("referring", "single"): 3,
        ("referring", "multi"): 1,
        ("reasoning", "single"): 2,
        ("reasoning", "multi"): 1,
    }


def test_selection_meets_quotas_and_excludes_no_target():
    records = _pool({(0, 1): 500, (0, 2): 100, (1, 1): 250, (1, 3): 150}, no_target=40)
    selection = stratified_sample(records, target_size=200, seed=3)
    assert len(selection.selected) == 200
    assert selection.excluded == 40
    assert all(r.type_id != 2 for r in selection.selected)
    assert len({r.key for r in selection.selected}) == 200
    # every stratum has enough: the selection is exactly the quotas (type 60/40 x instance 75/25)
    assert (
        selection.after
        == selection.quotas
        == {
            ("referring", "single"): 90,
            ("referring", "multi"): 30,
            ("reasoning", "single"): 60,
            ("reasoning", "multi"): 20,
        }
    )
    positions = {r.key: i for i, r in enumerate(records)}
    assert [positions[r.key] for r in selection.selected] == sorted(
        positions[r.key] for r in selection.selected
    )
    table = selection.table()
    assert "reasoning / multi" in table and "excluded (no target)" in table


def test_short_strata_are_topped_up_from_the_rest_to_the_exact_target():
    # reasoning/multi has 2 expressions but a quota of 0.5 x 0.5 x 40 = 10: the other 8 come from the rest
    records = _pool({(0, 1): 49, (0, 2): 1, (1, 1): 1, (1, 2): 49})
    selection = stratified_sample(records, target_size=40, seed=0)
    assert len(selection.selected) == 40
    counts = Counter(stratum_of(r) for r in selection.selected)
    assert counts[("referring", "multi")] == 1 and counts[("reasoning", "single")] == 1
    assert counts[("referring", "single")] + counts[("reasoning", "multi")] == 38
    assert counts[("referring", "single")] >= 10 and counts[("reasoning", "multi")] >= 10


def test_target_larger_than_pool_takes_everything_and_seed_reproduces():
    records = _pool({(0, 1): 30, (1, 2): 20}, no_target=5)
    assert len(stratified_sample(records, target_size=10_000, seed=1).selected) == 50
    first = [r.key for r in stratified_sample(records, 17, seed=5).selected]
    assert first == [r.key for r in stratified_sample(records, 17, seed=5).selected]
    others = {tuple(r.key for r in stratified_sample(records, 17, seed=s).selected) for s in range(6, 12)}
    assert len(others - {tuple(first)}) >= 5  # other seeds draw other subsets
    with pytest.raises(ValueError, match="target_size"):
        stratified_sample(records, 0)


def test_untyped_datasets_stratify_by_instance_only():
    records = _pool({(None, 1): 60, (None, 2): 40})
    selection = stratified_sample(records, 10, seed=0)
    assert selection.after == {("untyped", "single"): 6, ("untyped", "multi"): 4}


def test_veason_sample_writes_the_input_format_readers_read_back(
    synthetic_revos: Path, tmp_path: Path, capsys
):
    out = tmp_path / "meta_expressions_train_.json"
    assert (
        veason(
            [
                "sample",
                f"data.root={synthetic_revos}",
                "sample.target_size=9",
                "sample.seed=2",
                f"sample.output={out}",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "before" in printed and "after" in printed and str(out) in printed
    source = json.loads((synthetic_revos / "meta_expressions_train_.json").read_text())
    written = json.loads(out.read_text())
    keys = meta_document_keys(written, str(out))
    assert len(keys) == 9
    for video, exp_id in keys:  # entries are copied unchanged, videos keep their fields
        assert (
            written["videos"][video]["expressions"][exp_id] == source["videos"][video]["expressions"][exp_id]
        )
        assert written["videos"][video]["frames"] == source["videos"][video]["frames"]
    # the written file is a ReVOS split our reader opens (placed in the dataset root under a split name)
    (synthetic_revos / "meta_expressions_cotpick_.json").write_text(out.read_text())
    try:
        reread = open_dataset("revos", str(synthetic_revos), "cotpick")
        assert sorted((r.video, r.exp_id) for r in reread.expressions()) == sorted(keys)
        assert all(r.type_id in (0, 1) for r in reread.expressions())
    finally:
        (synthetic_revos / "meta_expressions_cotpick_.json").unlink()
    again = tmp_path / "again.json"
    veason(
        [
            "sample",
            f"data.root={synthetic_revos}",
            "sample.target_size=9",
            "sample.seed=2",
            f"sample.output={again}",
        ]
    )
    assert again.read_bytes() == out.read_bytes()


def test_reasonvos_list_layout_round_trip(synthetic_reasonvos: Path, tmp_path: Path):
    doc = json.loads((synthetic_reasonvos / "meta_expressions.json").read_text())
    for video in doc["videos"].values():  # the release's copies may lack exp_id: position is the id
        for exp in video["expressions"]:
            exp.pop("exp_id")
    (tmp_path / "meta_expressions.json").write_text(json.dumps(doc))
    keys = meta_document_keys(doc, "meta")
    picked = keys[1::3]
    filtered = filter_meta_document(doc, picked)
    assert isinstance(next(iter(filtered["videos"].values()))["expressions"], list)
    assert meta_document_keys(filtered, "filtered") == picked
    root = tmp_path / "reasonvos"
    root.mkdir()
    (root / "meta_expressions.json").write_text(json.dumps(filtered))
    reread = open_dataset("reasonvos", str(root), "valid")
    assert [(r.video, r.exp_id) for r in reread.expressions()] == picked
    with pytest.raises(KeyError, match="not in the meta-expressions document"):
        filter_meta_document(doc, [("nope", "0")])
