"""What a program will read and write, checked before it starts Ray or reserves a GPU: a mistake in the config
costs seconds and one message naming the key, its value and the fix, not a traceback from a pool minutes later.

Checks (each only where the program uses it):
- the dataset: `data.root` exists (a local folder, or an s3:// prefix that answers within seconds), the split's
  expression file parses, its mask file is there;
- models: `model.policy` (and `model.reference`) a checkpoint folder with a config.json and weight files, or an
  s3:// copy holding a config.json, or a hub id; `reward.sam2.checkpoint` a .pt file or a folder holding one;
- outputs: a local output folder can be created and written.
Object storage is asked with one attempt and short timeouts, so a wrong endpoint fails in seconds.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path

from veason_ray.config import StorageConfig, VeasonConfig
from veason_ray.models.specs import is_hub_id, is_local_path
from veason_ray.object_store import is_s3_uri, join_uri, store_for

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
DATA_HINT = "`make demo` (or `veason synth --out DIR`) writes the demo's data"
MODELS_HINT = "`make demo` (or `veason tiny-models --out DIR`) writes the demo's tiny models"


def quick_storage(storage: StorageConfig) -> StorageConfig:
    """`storage` asked once, with short timeouts: enough to tell a wrong endpoint or bucket from a slow one."""
    return dataclasses.replace(
        storage, max_attempts=1, connect_timeout_s=3.0, request_timeout_s=10.0, outage_timeout_s=0.0
    )


def _s3_problem(key: str, uri: str, storage: StorageConfig, must_hold: str = "") -> str | None:
    """None when `uri` (or `uri/must_hold`) answers; else a message naming the key."""
    target = join_uri(uri, must_hold) if must_hold else uri
    try:
        store = store_for(target, quick_storage(storage))
        found = store.exists(target)  # a file, or a prefix holding files (one request, not a listing)
    except Exception as error:  # noqa: BLE001 - every storage failure becomes the key's message
        return f"{key}={uri}: object storage did not answer ({error}); check storage.endpoint_url and credentials"
    if not found:
        what = f"no {must_hold} there" if must_hold else "nothing there"
        return f"{key}={uri}: {what}"
    return None


def dataset_problems(cfg: VeasonConfig, split: str, key: str = "data.root") -> list[str]:
    from veason_ray.datasets import DatasetFormatError, open_dataset

    root = cfg.data.root
    if not root:
        return [f"{key} is empty: point it at a dataset folder or s3:// prefix"]
    if is_s3_uri(root):
        problem = _s3_problem(key, root, cfg.storage)
        if problem:
            return [problem]
    elif not Path(root).is_dir():
        return [f"{key}={root}: no such folder; point it at a {cfg.data.dataset} copy; {DATA_HINT}"]
    try:
        dataset = open_dataset(cfg.data.dataset, root, split, quick_storage(cfg.storage))
    except (DatasetFormatError, OSError, ValueError) as error:
        return [f"{key}={root} (data.dataset={cfg.data.dataset}, split {split}): {error}"]
    masks = getattr(dataset, "mask_dict_uri", None)
    if masks and not store_for(masks, quick_storage(cfg.storage)).exists(masks):
        return [f"{key}={root}: {masks} is missing (the masks of split {split})"]
    return []


def model_problems(key: str, spec: str, storage: StorageConfig) -> list[str]:
    """A policy checkpoint: a folder with config.json and weights, an s3:// copy of one, or a hub id."""
    if not spec:
        return [f"{key} is empty: give a checkpoint folder, an s3:// copy or a hub id (owner/name)"]
    if is_s3_uri(spec):
        problem = _s3_problem(key, spec, storage, must_hold="config.json")
        return [problem] if problem else []
    if not is_local_path(spec) or is_hub_id(spec):
        return []  # a hub id or URL: resolved where it loads
    path = Path(spec)
    if not path.exists():
        return [f"{key}={spec}: no such folder; {MODELS_HINT}"]
    if not path.is_dir():
        return [f"{key}={spec}: a file; expected a checkpoint folder (config.json and weights)"]
    if not (path / "config.json").is_file():
        return [f"{key}={spec}: no config.json in the folder; expected a Hugging Face checkpoint folder"]
    if not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()):
        return [
            f"{key}={spec}: no weights in the folder (*.safetensors or *.bin); was the export interrupted?"
        ]
    return []


def sam2_problems(cfg: VeasonConfig) -> list[str]:
    key, spec = "reward.sam2.checkpoint", cfg.reward.sam2.checkpoint
    if cfg.reward.propagator != "sam2":
        return []
    if is_s3_uri(spec):
        problem = _s3_problem(key, spec, cfg.storage)
        return [problem] if problem else []
    if not is_local_path(spec) or is_hub_id(spec):
        return []
    path = Path(spec)
    if not path.exists():
        return [f"{key}={spec}: no such file or folder; {MODELS_HINT}"]
    if path.is_dir() and not any(path.glob("*.pt")):
        return [f"{key}={spec}: no .pt checkpoint in the folder"]
    return []


def input_problems(key: str, spec: str, storage: StorageConfig) -> list[str]:
    """A file or folder to read: on this machine, or in object storage (URLs are checked when fetched)."""
    if is_s3_uri(spec):
        problem = _s3_problem(key, spec, storage)
        return [problem] if problem else []
    if "://" not in spec and not Path(spec).exists():
        return [f"{key}={spec}: no such file or folder"]
    return []


def output_problems(key: str, folder: str) -> list[str]:
    """A local output folder must be creatable and writable (s3:// outputs are checked when written)."""
    if not folder or is_s3_uri(folder) or "://" in folder:
        return []
    path = Path(folder)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        return [f"{key}={folder}: {existing} is not a folder"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"{key}={folder}: {existing} is not writable by this user"]
    return []


def check(program: str, problems: Iterable[str]) -> None:
    """Exit with every problem found, one per line, before anything starts."""
    found = list(problems)
    if found:
        raise SystemExit(f"veason {program}: cannot start:\n  " + "\n  ".join(found))


def policy_problems(cfg: VeasonConfig) -> list[str]:
    problems = model_problems("model.policy", cfg.model.policy, cfg.storage)
    if cfg.model.reference:
        problems += model_problems("model.reference", cfg.model.reference, cfg.storage)
    return problems


def training_problems(cfg: VeasonConfig) -> list[str]:
    """`veason grpo`: the training split, the policy (and reference), SAM2, the run's folder."""
    return [
        *dataset_problems(cfg, cfg.data.train_split),
        *policy_problems(cfg),
        *sam2_problems(cfg),
        *output_problems("run.output_dir", cfg.run.output_dir),
    ]


def evaluation_problems(cfg: VeasonConfig) -> list[str]:
    """`veason eval`: the evaluation split, the policy (unless ground-truth answers), SAM2, the output folder."""
    problems = dataset_problems(cfg, cfg.eval.split or cfg.data.eval_split)
    if cfg.eval.answers == "policy":
        problems += model_problems("model.policy", cfg.model.policy, cfg.storage)
    key = "eval.output_dir" if cfg.eval.output_dir else "run.output_dir"
    return [*problems, *sam2_problems(cfg), *output_problems(key, cfg.eval.output_dir or cfg.run.output_dir)]
