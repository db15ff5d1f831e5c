"""`veason sample CONFIG [key=value ...]`: a stratified subset of the training expressions (docs/method.md section 6).

Reads `data.train_split` of `data.dataset` under `data.root`, selects `sample.target_size` expressions with
:func:`veason_ray.stratified_sampling.stratified_sample` (seed `sample.seed`), and writes the selected
meta-expressions file in the input's own format (the ReVOS/MeViS object layout or the ReasonVOS list layout,
every field of the kept entries unchanged) to `sample.output` (default `<run.output_dir>/sample/<input file
name>`). Prints the distribution before and after. `veason cot cot.meta=<that file>` reads it back.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from typing import Any

from pipelines.config_command import add_config_arguments, config_from_args
from pipelines.console import open_console, say
from veason_ray.config import VeasonConfig
from veason_ray.datasets import DatasetFormatError, ExpressionRecord, VOSDataset, open_dataset
from veason_ray.datasets.base import read_json
from veason_ray.object_store import join_uri, store_for
from veason_ray.stratified_sampling import stratified_sample

Key = tuple[str, str]  # (video, exp_id)


def _expression_items(video_entry: dict[str, Any]) -> list[tuple[str, Any]]:
    """(exp_id, entry) of one video; list layouts (ReasonVOS) use the entry's exp_id, else its position."""
    expressions = video_entry.get("expressions")
    if isinstance(expressions, dict):
        return [(str(k), v) for k, v in expressions.items()]
    if isinstance(expressions, list):
        return [
            (str(e.get("exp_id", i)) if isinstance(e, dict) else str(i), e) for i, e in enumerate(expressions)
        ]
    raise DatasetFormatError(f"expressions: expected an object or a list, got {type(expressions).__name__}")


def filter_meta_document(doc: dict[str, Any], keys: Iterable[Key]) -> dict[str, Any]:
    """The meta-expressions document with only the expressions named by ``keys`` (videos left without one are
    dropped; other fields are kept as they are). A list-layout entry that had no ``exp_id`` gets its original
    position as ``exp_id``, so readers give it the same key after filtering."""
    wanted = set(keys)
    videos: dict[str, Any] = {}
    for name, entry in doc["videos"].items():
        kept = [(exp_id, exp) for exp_id, exp in _expression_items(entry) if (name, exp_id) in wanted]
        if not kept:
            continue
        if isinstance(entry["expressions"], dict):
            expressions: Any = dict(kept)
        else:
            expressions = [{**exp, "exp_id": exp.get("exp_id", exp_id)} for exp_id, exp in kept]
        videos[name] = {**entry, "expressions": expressions}
    missing = wanted - {(v, e) for v, entry in videos.items() for e, _ in _expression_items(entry)}
    if missing:
        raise KeyError(f"expressions not in the meta-expressions document: {sorted(missing)[:5]}")
    return {**doc, "videos": videos}


def meta_document_keys(doc: Any, uri: str) -> list[Key]:
    """Every (video, exp_id) of a meta-expressions document, in file order; DatasetFormatError naming ``uri``."""
    if not isinstance(doc, dict) or not isinstance(doc.get("videos"), dict):
        raise DatasetFormatError(
            f"{uri}: expected an object with a 'videos' object (a meta-expressions file)"
        )
    keys = []
    for name, entry in doc["videos"].items():
        if not isinstance(entry, dict):
            raise DatasetFormatError(f"{uri}: videos[{name!r}]: expected an object")
        try:
            keys.extend((name, exp_id) for exp_id, _ in _expression_items(entry))
        except DatasetFormatError as e:
            raise DatasetFormatError(f"{uri}: videos[{name!r}].{e}") from None
    return keys


def select_records(dataset: VOSDataset, keys: list[Key], uri: str) -> list[ExpressionRecord]:
    """The dataset's records named by ``keys`` (in that order); a key the split lacks is an error naming it."""
    by_key = {(r.video, r.exp_id): r for r in dataset.expressions()}
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise SystemExit(
            f"{uri}: {len(missing)} expressions are not in split {dataset.split!r} of {dataset.root} "
            f"(first: video {missing[0][0]!r} exp_id {missing[0][1]!r}); set data.root / cot.split to the "
            "dataset the file was sampled from"
        )
    return [by_key[k] for k in keys]


def default_output(cfg: VeasonConfig, meta_uri: str) -> str:
    """`sample.output`, or `<run.output_dir>/sample/<the input meta file's name>`."""
    return cfg.sample.output or join_uri(cfg.run.output_dir, "sample", meta_uri.rsplit("/", 1)[-1])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, "sample")
    open_console(cfg, "sample")
    dataset = open_dataset(cfg.data.dataset, cfg.data.root, cfg.data.train_split, cfg.storage)
    records = list(dataset.expressions())
    selection = stratified_sample(records, cfg.sample.target_size, cfg.sample.seed)
    meta_uri = dataset.meta_uri
    doc = read_json(dataset.store, meta_uri)
    out_doc = filter_meta_document(doc, [(r.video, r.exp_id) for r in selection.selected])
    output = default_output(cfg, meta_uri)
    store_for(output, cfg.storage).write_bytes(output, json.dumps(out_doc).encode("utf-8"))
    say(
        f"sample: {len(selection.selected)} of {len(records)} expressions of {cfg.data.dataset} "
        f"{cfg.data.train_split} (target {cfg.sample.target_size}, seed {cfg.sample.seed})"
    )
    say(selection.table())
    say(f"wrote {output}")
    return 0
