"""Training checkpoints: the whole learner state (DeepSpeed model, optimizer, scheduler, step; every rank's RNG)
under `<root>/step_<N>/`, to a local folder or s3://, and how to find the latest complete one.

Layout of one checkpoint (`tag` = `step_00000012`):
    <root>/<tag>/...                  DeepSpeed's files (model states, per-rank optimizer shards)
    <root>/<tag>/rng_rank<R>.pt       python, numpy, torch (and CUDA) generator states of rank R
    <root>/<tag>/<other parts>        what the caller adds (the GRPO driver: its data position)
    <root>/<tag>/COMPLETE             written last, once every part is in place
A checkpoint without COMPLETE (a run killed while saving) is never resumed from, and `prune_checkpoints` removes
it once a later one is complete, with the complete ones beyond the newest `keep`.

On s3:// each rank saves into a local staging folder and uploads what it wrote; loading downloads the tag.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from veason_ray.config import StorageConfig
from veason_ray.object_store import is_s3_uri, join_uri, store_for

COMPLETE_MARKER = "COMPLETE"
_TAG = re.compile(r"^step_(\d+)$")


def checkpoint_tag(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _staging(root: str, rank: int) -> Path:
    """A local folder of rank `rank` for checkpoints under the remote `root` (one per rank: ranks on one node
    must not upload or delete each other's files)."""
    base = Path(tempfile.gettempdir()) / "veason_checkpoints"
    return base / re.sub(r"[^\w.-]+", "_", root.rstrip("/")) / f"rank{rank}"


def save_engine_state(
    engine: Any, root: str, step: int, rank: int, storage: StorageConfig | None = None
) -> str:
    """Save this rank's part of checkpoint `step` under `root` (every rank of the group calls it); returns the
    checkpoint's URI. The caller marks it complete (`mark_complete`) once all ranks returned."""
    tag = checkpoint_tag(step)
    remote = is_s3_uri(root)
    local_root = _staging(root, rank) if remote else Path(root)
    engine.save_checkpoint(str(local_root), tag=tag, client_state={"step": step}, save_latest=False)
    torch.save(rng_state(), local_root / tag / f"rng_rank{rank}.pt")
    uri = join_uri(root, tag)
    if remote:
        store_for(root, storage).upload_tree(local_root / tag, uri)
        shutil.rmtree(local_root / tag, ignore_errors=True)
    return uri


def load_engine_state(engine: Any, uri: str, rank: int, storage: StorageConfig | None = None) -> int:
    """Load checkpoint `uri` (a `<root>/step_<N>` folder) into `engine` and this rank's RNG; returns its step."""
    uri = uri.rstrip("/")
    tag = uri.rsplit("/", 1)[-1]
    if not _TAG.match(tag):
        raise ValueError(f"{uri}: not a checkpoint folder (expected <root>/step_<N>)")
    local_root = Path(uri).parent
    if is_s3_uri(uri):
        local_root = _staging(uri.rsplit("/", 1)[0], rank)
        store_for(uri, storage).download_tree(uri, local_root / tag)
    path, client_state = engine.load_checkpoint(str(local_root), tag=tag)
    if path is None:
        raise FileNotFoundError(f"{uri}: DeepSpeed found no checkpoint to load")
    set_rng_state(torch.load(local_root / tag / f"rng_rank{rank}.pt", weights_only=False))
    return int(client_state["step"])


def mark_complete(uri: str, info: dict[str, Any], storage: StorageConfig | None = None) -> None:
    """Write the COMPLETE marker of checkpoint `uri` (with `info`, e.g. the step and the time)."""
    store_for(uri, storage).write_bytes(join_uri(uri, COMPLETE_MARKER), json.dumps(info).encode())


def _checkpoint_folders(root: str, storage: StorageConfig | None) -> dict[int, tuple[str, bool]]:
    """Every checkpoint folder under `root`: its step -> (its URI, whether its COMPLETE marker is there)."""
    store = store_for(root, storage)
    if not store.exists(root):
        return {}
    prefix = root.rstrip("/")
    folders: dict[int, tuple[str, bool]] = {}
    for uri in store.list_files(root):
        parts = uri[len(prefix) + 1 :].split("/")
        if len(parts) >= 2 and (match := _TAG.match(parts[0])):
            step = int(match.group(1))
            complete = len(parts) == 2 and parts[1] == COMPLETE_MARKER
            folders[step] = (join_uri(root, parts[0]), folders.get(step, ("", False))[1] or complete)
    return folders


def latest_complete(root: str, storage: StorageConfig | None = None) -> str | None:
    """The URI of the highest-step complete checkpoint under `root`, or None."""
    complete = {step: uri for step, (uri, done) in _checkpoint_folders(root, storage).items() if done}
    return complete[max(complete)] if complete else None


def prune_checkpoints(root: str, keep: int, storage: StorageConfig | None = None) -> list[str]:
    """Remove, under `root`, the complete checkpoints older than the newest `keep` (0: keep them all) and every
    incomplete one older than the newest complete one (a save that was cut short); returns what was removed.
    A checkpoint newer than the newest complete one may be a save in progress and is left alone."""
    folders = _checkpoint_folders(root, storage)
    complete = sorted(step for step, (_, done) in folders.items() if done)
    if not complete:
        return []
    kept = set(complete[-keep:]) if keep > 0 else set(complete)
    doomed = [folders[s][0] for s in sorted(folders) if s < complete[-1] and s not in kept]
    store = store_for(root, storage)
    for uri in doomed:
        store.delete_tree(uri)
    return doomed
