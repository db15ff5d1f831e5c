"""An output folder that may live in object storage: programs write files into a local folder, the mirror keeps
the destination up to date.

For a local destination the local folder is the destination itself and the mirror does nothing. For an
``s3://`` destination the local folder is a staging folder on this machine: :meth:`OutputMirror.pull` fetches
the files a resumed run continues (a ``results.jsonl``, a ``metrics.jsonl``) and :meth:`OutputMirror.push`
uploads every file that changed since the last push. A job whose head node is lost therefore loses at most what
was written since its last push, and its resubmission (on any node) continues from what the destination holds.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from veason_ray.config import StorageConfig
from veason_ray.object_store import TMP_MARK, is_s3_uri, join_uri, store_for

STAGING_ROOT = "veason_outputs"  # below the system's temporary folder: one staging folder per destination


class OutputMirror:
    """``local``: where to write; ``uri``: where the files must end up (the same folder when not s3://)."""

    def __init__(
        self,
        uri: str,
        storage: StorageConfig | None = None,
        exclude: tuple[str, ...] = (),
        staging_root: str | Path | None = None,
    ) -> None:
        self.uri = uri.rstrip("/") if is_s3_uri(uri) else uri
        self.remote = is_s3_uri(uri)
        self.exclude = exclude  # top-level names never uploaded (a local tool's scratch folder)
        self._pushed: dict[str, tuple[int, int]] = {}
        if not self.remote:
            self.local = Path(uri)
            self.local.mkdir(parents=True, exist_ok=True)
            return
        self.store = store_for(self.uri, storage)
        root = Path(staging_root) if staging_root else Path(tempfile.gettempdir()) / STAGING_ROOT
        self.local = root / hashlib.sha1(self.uri.encode()).hexdigest()[:16]
        shutil.rmtree(self.local, ignore_errors=True)  # the destination is the truth, not an earlier staging
        self.local.mkdir(parents=True, exist_ok=True)

    def uri_of(self, relative: str) -> str:
        """Where the file ``relative`` to the local folder ends up."""
        return join_uri(self.uri, relative) if self.remote else str(self.local / relative)

    def pull(self, *relatives: str) -> list[str]:
        """Fetch these files from the destination into the local folder, where they exist there; returns the
        ones fetched. A pulled file counts as pushed until it changes."""
        fetched = []
        if not self.remote:
            return fetched
        for relative in relatives:
            uri = join_uri(self.uri, relative)
            if not self.store.exists(uri):
                continue
            path = self.local / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self.store.read_bytes(uri))
            self._pushed[relative] = _signature(path)
            fetched.append(relative)
        return fetched

    def push(self) -> int:
        """Upload every file of the local folder that is new or changed since the last push (size or
        modification time); returns the number uploaded. Nothing to do for a local destination."""
        if not self.remote:
            return 0
        uploaded = 0
        for path in sorted(p for p in self.local.rglob("*") if p.is_file()):
            relative = path.relative_to(self.local).as_posix()
            if relative.split("/", 1)[0] in self.exclude or TMP_MARK in path.name:
                continue
            signature = _signature(path)
            if self._pushed.get(relative) == signature:
                continue
            self.store.write_bytes(join_uri(self.uri, relative), path.read_bytes())
            self._pushed[relative] = signature
            uploaded += 1
        return uploaded

    def __repr__(self) -> str:
        return f"OutputMirror({self.uri!r}, local={str(self.local)!r})"


def _signature(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns
