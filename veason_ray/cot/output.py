"""The CoT output folder: records, failures, images and LLaMA-Factory's dataset_info, resumable.

    <output_dir>/cot.jsonl          one record per line (veason_ray.cot.records), appended and flushed one by one
    <output_dir>/failures.jsonl     one line per failed attempt: {"key", "error_type", "error", "teacher", "time"}
    <output_dir>/images/<key>/      the clean 560x560 frames of each record (written before its line)
    <output_dir>/dataset_info.json  the LLaMA-Factory dataset entry `veason_cot`
    <output_dir>/cot_settings.json  what shapes a record's prompt (dataset, split, frames, teacher kind, seed)

Resume: a key with a line in cot.jsonl is done and never asked again. A key whose last event is a failure is
retried by the next run unless ``retry_failed`` is off; keys never tried always run. A line cut short by a crash
(no final newline) is removed when the folder is opened, so the next append starts on a clean line; its images
are simply rewritten. A folder resumes only under the settings it was started with: a rerun asking for other
ones (say 4 frames where the records hold 7) would mix both kinds of records silently, so it is refused with
both settings named (:class:`SettingsMismatchError`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from veason_ray.cot.frames import encode_jpeg
from veason_ray.cot.jobs import CoTJob
from veason_ray.cot.records import (
    COT_FILE,
    DATASET_INFO,
    DATASET_INFO_FILE,
    FAILURES_FILE,
    image_path,
    read_jsonl,
)

SETTINGS_FILE = "cot_settings.json"


class SettingsMismatchError(ValueError):
    """The output folder holds records made under other settings than this run's."""


def _drop_partial_last_line(path: Path) -> None:
    """Truncate a file after its last newline (an interrupted append leaves an unterminated line)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


class CoTOutput:
    """Appends records and failures to a local output folder and knows which keys are done or failed."""

    def __init__(self, output_dir: str | Path, settings: dict[str, Any] | None = None):
        """``settings``: what shapes a record (JSON values); recorded by the first run, checked by later ones."""
        self.root = Path(output_dir)
        if str(output_dir).startswith("s3://"):
            raise ValueError(
                f"cot.output_dir {output_dir}: must be a local folder (records are appended line by line and "
                "LLaMA-Factory reads local files); copy the folder to object storage afterwards"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        self.records_path = self.root / COT_FILE
        self.failures_path = self.root / FAILURES_FILE
        if settings is not None:
            self._check_settings(settings)
        for path in (self.records_path, self.failures_path):
            _drop_partial_last_line(path)
        self.done: set[str] = {r["veason"]["key"] for r in read_jsonl(self.records_path) if "veason" in r}
        self.last_failure: dict[str, dict[str, Any]] = {}
        for failure in read_jsonl(self.failures_path):
            if failure.get("key") not in self.done:
                self.last_failure[failure["key"]] = failure
        self._records = open(self.records_path, "a", encoding="utf-8")
        self._failures = open(self.failures_path, "a", encoding="utf-8")

    def _check_settings(self, settings: dict[str, Any]) -> None:
        path = self.root / SETTINGS_FILE
        wanted = json.loads(json.dumps(settings))  # as it reads back (tuples become lists)
        if path.exists():
            saved = json.loads(path.read_text())
            differ = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
            if differ:
                changes = ", ".join(f"{k}: {saved.get(k)!r} there, {wanted.get(k)!r} now" for k in differ)
                raise SettingsMismatchError(
                    f"{self.root} holds CoT records made with other settings ({changes}); "
                    "use another cot.output_dir or delete that folder"
                )
        elif self.records_path.exists() and self.records_path.stat().st_size > 0:
            return  # records from before settings were recorded: nothing to check them against
        else:
            path.write_text(json.dumps(wanted, indent=2) + "\n")

    def pending(self, keys: list[str], retry_failed: bool = True) -> list[str]:
        """The keys this run must do, in order: not done, and not failed before unless ``retry_failed``."""
        return [k for k in keys if k not in self.done and (retry_failed or k not in self.last_failure)]

    def write_images(self, job: CoTJob) -> None:
        """The job's clean frames as JPEGs at their record paths (before the record line is appended)."""
        for frame_index, frame in zip(job.frame_indices, job.clean_frames, strict=True):
            path = self.root / image_path(job.key, frame_index)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_jpeg(frame))

    def append_record(self, record: dict[str, Any]) -> None:
        key = record["veason"]["key"]
        self._records.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._records.flush()
        self.done.add(key)
        self.last_failure.pop(key, None)

    def append_failure(self, key: str, error: BaseException, teacher: str) -> dict[str, Any]:
        failure = {
            "key": key,
            "error_type": type(error).__name__,
            "error": str(error),
            "attempts": getattr(error, "attempts", None),
            "teacher": teacher,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        self._failures.write(json.dumps(failure, ensure_ascii=False) + "\n")
        self._failures.flush()
        self.last_failure[key] = failure
        return failure

    def write_dataset_info(self) -> Path:
        path = self.root / DATASET_INFO_FILE
        path.write_text(json.dumps(DATASET_INFO, indent=2) + "\n")
        return path

    def close(self) -> None:
        self._records.close()
        self._failures.close()
