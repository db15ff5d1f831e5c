"""Paths in a submitted job (`ray job submit --working-dir .`): where a relative path would go wrong.

A job's driver runs in Ray's temporary copy of the working directory (`.../runtime_resources/
working_dir_files/...`), made from the files git does not ignore. So in a job:
- an output at a relative path (`run.output_dir=runs/x`) would be written into that copy and lost with it: no
  resubmission could resume from it. Refused: outputs are s3:// URIs or absolute paths on shared storage.
- an input at a relative path that is not in the copy (data and models under the git-ignored `runs/`) cannot
  be read there. Refused with the same advice; a relative input that the copy holds (a config under
  `configs/`) is read as usual.
A program run by hand (not as a job) keeps relative paths: they are relative to where it was started.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from veason_ray.config import VeasonConfig
from veason_ray.models.specs import is_hub_id
from veason_ray.object_store import is_s3_uri

# Ray's variable holding a job driver's runtime environment (ray._private.runtime_env.constants)
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"

OUTPUT_KEYS = (
    "run.output_dir",
    "eval.output_dir",
    "infer.output_dir",
    "sample.output",
    "cot.output_dir",
    "sft.output_dir",
    "data.cache_uri",
)
INPUT_KEYS = ("data.root", "model.policy", "reward.sam2.checkpoint", "infer.input", "cot.meta", "sft.records")


def in_working_dir_copy(cwd: Path | None = None, environ: dict[str, str] | None = None) -> bool:
    """Whether this process is a job driver running in Ray's copy of an uploaded working directory."""
    environ = os.environ if environ is None else environ
    cwd = Path.cwd() if cwd is None else cwd
    if "runtime_resources" in cwd.parts:
        return True
    try:
        runtime_env = json.loads(environ.get(_JOB_CONFIG_ENV, "") or "{}").get("runtime_env") or {}
    except (ValueError, AttributeError):
        return False
    return bool(runtime_env.get("working_dir"))


def _value(cfg: VeasonConfig, key: str) -> str:
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return str(node or "")


def relative_path_problems(cfg: VeasonConfig, cwd: Path | None = None) -> list[str]:
    """One message per key whose path cannot work in a submitted job (see the module docstring)."""
    cwd = Path.cwd() if cwd is None else cwd
    problems = []
    advice = "give an s3:// URI or an absolute path on storage every node and the next job can reach"
    for key in OUTPUT_KEYS:
        value = _value(cfg, key)
        if value and not is_s3_uri(value) and not Path(value).is_absolute():
            problems.append(
                f"{key}={value} is a relative path: in a submitted job it would be written into Ray's "
                f"temporary copy of the working directory and lost when the job ends; {advice}"
            )
    for key in INPUT_KEYS:
        value = _value(cfg, key)
        if not value or is_s3_uri(value) or "://" in value or Path(value).is_absolute():
            continue
        if (cwd / value).exists() or (key == "model.policy" and is_hub_id(value)):
            continue  # in the uploaded copy, or a hub id
        problems.append(
            f"{key}={value} is a relative path that the job's copy of the working directory does not hold "
            f"(`--working-dir` uploads only files git does not ignore); {advice}"
        )
    return problems


def check_job_paths(cfg: VeasonConfig, program: str) -> None:
    """In a submitted job, refuse the paths that would be lost or missing there (SystemExit naming them)."""
    if not in_working_dir_copy():
        return
    problems = relative_path_problems(cfg)
    if problems:
        raise SystemExit(f"veason {program}: " + "\n  ".join(["paths that cannot work in a job:", *problems]))
