"""The object-store seam: read, write and list files by URI, local paths and ``s3://bucket/key`` alike.

Everything in veason-ray that touches storage goes through an :class:`ObjectStore` chosen by
:func:`store_for`: dataset readers, checkpoint download and upload, run outputs. S3 is reached through
``pyarrow.fs.S3FileSystem`` (endpoint, region, credentials, retries and timeouts from
:class:`~veason_ray.config.StorageConfig`, falling back to the standard AWS environment). No other module
imports boto3 or builds a filesystem of its own.

Error messages name the URI and never contain credentials. An S3 call that fails because the store is
unreachable or failing (connection refused, timeouts, 5xx, throttling) is retried with backoff for
``storage.outage_timeout_s`` before it fails; one that fails for the request's own reason fails at once.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import BinaryIO, TypeVar
from urllib.parse import urlparse

from pyarrow import fs as pafs

from veason_ray.config import StorageConfig

S3_SCHEME = "s3://"
_COPY_CHUNK = 8 << 20  # bytes per read when streaming a file between stores
_TRANSFER_THREADS = 8  # files moved at once by download_tree / upload_tree
TMP_MARK = ".tmp-"  # infix of the temporary files that atomic writes rename into place
# the AWS SDK's error kinds (and HTTP statuses) that say the store, not the request, failed: retried
_OUTAGE = re.compile(
    r"AWS Error (NETWORK_CONNECTION|SERVICE_UNAVAILABLE|SLOW_DOWN|INTERNAL_FAILURE|THROTTLING|REQUEST_TIMEOUT)"
    r"|HTTP status 5\d\d|curlCode: (7|28|52|55|56)\b"
)
_RETRY_FIRST_S, _RETRY_MAX_S = 0.5, 10.0  # backoff between attempts during an outage

log = logging.getLogger(__name__)
T = TypeVar("T")


def is_s3_uri(uri: str) -> bool:
    """True for ``s3://bucket/key`` URIs."""
    return str(uri).startswith(S3_SCHEME)


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI with ``/`` (leading/trailing slashes of parts dropped)."""
    out = str(base)
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = f"{out.rstrip('/')}/{part}" if out else part
    return out


def _relative_key(uri: str, prefix: str) -> str:
    """The part of ``uri`` below ``prefix`` (a file URI equal to the prefix gives its base name)."""
    prefix = prefix.rstrip("/")
    if uri == prefix:
        return uri.rsplit("/", 1)[-1]
    return uri[len(prefix) + 1 :]


def _safe_destination(local_dir: Path, rel: str, uri: str) -> Path:
    parts = [p for p in rel.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise ValueError(f"{uri}: refusing to write outside {local_dir} (relative key {rel!r})")
    return local_dir.joinpath(*parts)


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextmanager
def _atomic_local_write(path: Path) -> Iterator[BinaryIO]:
    """Write to a temporary sibling renamed onto ``path`` when the block ends without error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _copy_stream(src: BinaryIO, dst: BinaryIO) -> int:
    total = 0
    while True:
        chunk = src.read(_COPY_CHUNK)
        if not chunk:
            return total
        dst.write(chunk)
        total += len(chunk)


class ObjectStore(abc.ABC):
    """Files addressed by URI. Implementations: :class:`LocalObjectStore`, :class:`S3ObjectStore`."""

    @abc.abstractmethod
    def read_bytes(self, uri: str) -> bytes:
        """The whole object. FileNotFoundError (naming the URI) when it does not exist."""

    @abc.abstractmethod
    def write_bytes(self, uri: str, data: bytes) -> None:
        """Create or replace the object; readers never see a partly written file."""

    @abc.abstractmethod
    def open_input(self, uri: str) -> BinaryIO:
        """A binary file object positioned at 0 (seekable; use it as a context manager)."""

    @abc.abstractmethod
    def exists(self, uri: str) -> bool:
        """True for an existing file or a folder (prefix) that holds files."""

    @abc.abstractmethod
    def list_files(self, uri_prefix: str) -> list[str]:
        """Every file below the folder ``uri_prefix``, recursively, as sorted full URIs; ``[uri_prefix]`` when
        it is itself a file; ``[]`` when nothing is there."""

    @abc.abstractmethod
    def file_size(self, uri: str) -> int:
        """Size in bytes; FileNotFoundError when absent."""

    @abc.abstractmethod
    def delete_tree(self, uri_prefix: str) -> None:
        """Remove the folder ``uri_prefix`` and everything below it; nothing when it does not exist."""

    @abc.abstractmethod
    def _sizes_below(self, uri_prefix: str) -> dict[str, int]:
        """``{file URI: size}`` for everything :meth:`list_files` would return."""

    @abc.abstractmethod
    def _open_output(self, uri: str) -> AbstractContextManager[BinaryIO]:
        """A writable stream (context manager) that creates the object when its block ends without error."""

    def _retrying(self, uri: str, action: str, call: Callable[[], T]) -> T:
        """`call()`, retried while the store is down (S3; a local store calls it once)."""
        return call()

    def download_tree(self, uri_prefix: str, local_dir: str | Path) -> Path:
        """Copy every file below ``uri_prefix`` into ``local_dir`` keeping relative paths; files already there
        with the same size are skipped, each file lands atomically (safe for several processes at once).
        FileNotFoundError when the prefix holds no file. Returns ``local_dir``."""
        local_dir = Path(local_dir)
        sizes = self._sizes_below(uri_prefix)
        if not sizes:
            raise FileNotFoundError(f"{uri_prefix}: no files to download")
        jobs = []
        for uri, size in sorted(sizes.items()):
            dst = _safe_destination(local_dir, _relative_key(uri, uri_prefix), uri)
            if dst.is_file() and dst.stat().st_size == size:
                continue
            jobs.append((uri, size, dst))

        def fetch_once(uri: str, size: int, dst: Path) -> None:
            with self.open_input(uri) as src, _atomic_local_write(dst) as out:
                got = _copy_stream(src, out)
                if got != size:
                    raise OSError(
                        f"{uri}: read {got} bytes, expected {size} (object changed during download?)"
                    )

        def fetch(job: tuple[str, int, Path]) -> None:
            self._retrying(job[0], "download", lambda: fetch_once(*job))

        local_dir.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(_TRANSFER_THREADS) as pool:
            list(pool.map(fetch, jobs))
        return local_dir

    def upload_tree(self, local_dir: str | Path, uri_prefix: str) -> int:
        """Copy every file below ``local_dir`` to ``uri_prefix`` keeping relative paths; returns the number of
        files written."""
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise FileNotFoundError(f"{local_dir}: not a folder")
        files = sorted(p for p in local_dir.rglob("*") if p.is_file() and TMP_MARK not in p.name)

        def put_once(path: Path, uri: str) -> None:
            with open(path, "rb") as src, self._open_output(uri) as out:
                _copy_stream(src, out)

        def put(path: Path) -> None:
            uri = join_uri(uri_prefix, path.relative_to(local_dir).as_posix())
            self._retrying(uri, "upload", lambda: put_once(path, uri))

        with ThreadPoolExecutor(_TRANSFER_THREADS) as pool:
            list(pool.map(put, files))
        return len(files)


class LocalObjectStore(ObjectStore):
    """Local files; ``file://`` URIs are accepted too. Writes go to a temporary sibling and are renamed."""

    @staticmethod
    def _path(uri: str) -> Path:
        uri = str(uri)
        return Path(uri[len("file://") :] if uri.startswith("file://") else uri)

    def read_bytes(self, uri: str) -> bytes:
        try:
            return self._path(uri).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{uri}: no such file") from None
        except IsADirectoryError:
            raise IsADirectoryError(f"{uri}: is a folder, not a file") from None

    def write_bytes(self, uri: str, data: bytes) -> None:
        with _atomic_local_write(self._path(uri)) as f:
            f.write(data)

    def open_input(self, uri: str) -> BinaryIO:
        try:
            return open(self._path(uri), "rb")
        except FileNotFoundError:
            raise FileNotFoundError(f"{uri}: no such file") from None

    def exists(self, uri: str) -> bool:
        return self._path(uri).exists()

    def file_size(self, uri: str) -> int:
        path = self._path(uri)
        if not path.is_file():
            raise FileNotFoundError(f"{uri}: no such file")
        return path.stat().st_size

    def _sizes_below(self, uri_prefix: str) -> dict[str, int]:
        root = self._path(uri_prefix)
        if root.is_file():
            return {str(uri_prefix): root.stat().st_size}
        out: dict[str, int] = {}
        for dirpath, _, names in os.walk(root):
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            for name in names:
                if TMP_MARK in name:
                    continue
                uri = join_uri(str(uri_prefix), rel_dir if rel_dir != "." else "", name)
                out[uri] = (Path(dirpath) / name).stat().st_size
        return out

    def list_files(self, uri_prefix: str) -> list[str]:
        return sorted(self._sizes_below(uri_prefix))

    def delete_tree(self, uri_prefix: str) -> None:
        shutil.rmtree(self._path(uri_prefix), ignore_errors=True)

    def _open_output(self, uri: str) -> AbstractContextManager[BinaryIO]:
        return _atomic_local_write(self._path(uri))

    def download_tree(self, uri_prefix: str, local_dir: str | Path) -> Path:
        if Path(local_dir).resolve() == self._path(uri_prefix).resolve():
            return Path(local_dir)  # already where it is wanted
        return super().download_tree(uri_prefix, local_dir)

    def __repr__(self) -> str:
        return "LocalObjectStore()"


def _split_endpoint(endpoint_url: str) -> tuple[str, str]:
    """``"http://host:port"`` -> (``"http"``, ``"host:port"``); a bare ``host:port`` means https."""
    if "://" not in endpoint_url:
        return "https", endpoint_url
    parsed = urlparse(endpoint_url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"storage endpoint_url {endpoint_url!r}: expected http(s)://host[:port]")
    return parsed.scheme, parsed.netloc


class S3ObjectStore(ObjectStore):
    """S3 and S3-compatible servers through ``pyarrow.fs.S3FileSystem``.

    Empty fields of ``storage`` fall back to the AWS environment variables, then to the AWS SDK's own
    credential chain. The filesystem is built lazily and not pickled, so a store can be shipped to workers.
    """

    def __init__(self, storage: StorageConfig | None = None):
        self._cfg = (storage or StorageConfig()).resolved()
        self._fs: pafs.S3FileSystem | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"cfg": self._cfg}

    def __setstate__(self, state: dict) -> None:
        self._cfg, self._fs, self._lock = state["cfg"], None, threading.Lock()

    def __repr__(self) -> str:
        return f"S3ObjectStore({self._cfg!r})"

    @property
    def filesystem(self) -> pafs.S3FileSystem:
        """The underlying ``pyarrow.fs.S3FileSystem`` (for Ray Data readers and writers)."""
        with self._lock:
            if self._fs is None:
                self._fs = self._build_filesystem()
            return self._fs

    def _build_filesystem(self) -> pafs.S3FileSystem:
        cfg = self._cfg
        kwargs: dict = {
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=max(1, cfg.max_attempts)),
            "connect_timeout": cfg.connect_timeout_s,
            "request_timeout": cfg.request_timeout_s,
        }
        if cfg.endpoint_url:
            kwargs["scheme"], kwargs["endpoint_override"] = _split_endpoint(cfg.endpoint_url)
        if cfg.region:
            kwargs["region"] = cfg.region
        if cfg.access_key_id or cfg.secret_access_key:
            if not (cfg.access_key_id and cfg.secret_access_key):
                raise ValueError("storage: access_key_id and secret_access_key must be given together")
            kwargs["access_key"] = cfg.access_key_id
            kwargs["secret_key"] = cfg.secret_access_key
            if cfg.session_token:
                kwargs["session_token"] = cfg.session_token
        return pafs.S3FileSystem(**kwargs)

    @staticmethod
    def _key(uri: str) -> str:
        if not is_s3_uri(uri):
            raise ValueError(f"{uri}: not an s3:// URI")
        key = uri[len(S3_SCHEME) :].strip("/")
        if not key:
            raise ValueError(f"{uri}: no bucket in URI")
        return key

    def _scrub(self, text: str) -> str:
        for secret in (self._cfg.secret_access_key, self._cfg.session_token, self._cfg.access_key_id):
            if secret:
                text = text.replace(secret, "***")
        return text

    @contextmanager
    def _errors(self, uri: str, action: str) -> Iterator[None]:
        """Re-raise storage errors with the URI and without credentials (and without the chained original,
        whose text we do not control)."""
        try:
            yield
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{uri}: not found ({self._scrub(str(e))})") from None
        except OSError as e:
            raise OSError(f"{uri}: {action} failed: {self._scrub(str(e))}") from None

    def _retrying(self, uri: str, action: str, call: Callable[[], T]) -> T:
        """`call()` (its errors as `_errors` words them), retried with backoff while the error says the store is
        unreachable or failing, for `storage.outage_timeout_s`; then the last error, saying how long it tried."""
        deadline = time.monotonic() + self._cfg.outage_timeout_s
        delay, attempts = _RETRY_FIRST_S, 0
        while True:
            attempts += 1
            try:
                with self._errors(uri, action):
                    return call()
            except FileNotFoundError:
                raise
            except OSError as error:
                if not _OUTAGE.search(str(error)):
                    raise
                if time.monotonic() + delay > deadline:
                    raise OSError(
                        f"{error} (the store failed for {attempts} attempts over storage.outage_timeout_s="
                        f"{self._cfg.outage_timeout_s:g} s)"
                    ) from None
                if attempts == 1:
                    log.warning("%s; retrying for up to %g s", error, self._cfg.outage_timeout_s)
                time.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)

    def read_bytes(self, uri: str) -> bytes:
        def read() -> bytes:
            with self.filesystem.open_input_stream(self._key(uri)) as f:
                return f.read()

        return self._retrying(uri, "read", read)

    def write_bytes(self, uri: str, data: bytes) -> None:
        def write() -> None:
            with self.filesystem.open_output_stream(self._key(uri)) as f:
                f.write(data)

        self._retrying(uri, "write", write)

    def open_input(self, uri: str) -> BinaryIO:
        return self._retrying(uri, "open", lambda: self.filesystem.open_input_file(self._key(uri)))

    def _info(self, uri: str) -> pafs.FileInfo:
        return self._retrying(uri, "stat", lambda: self.filesystem.get_file_info(self._key(uri)))

    def exists(self, uri: str) -> bool:
        return self._info(uri).type != pafs.FileType.NotFound

    def file_size(self, uri: str) -> int:
        info = self._info(uri)
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"{uri}: no such file")
        return info.size

    def _sizes_below(self, uri_prefix: str) -> dict[str, int]:
        key = self._key(uri_prefix)
        if "/" in key:  # a bucket alone is always a folder
            info = self._info(uri_prefix)
            if info.type == pafs.FileType.File:
                return {S3_SCHEME + key: info.size}
        selector = pafs.FileSelector(key, recursive=True, allow_not_found=True)
        infos = self._retrying(uri_prefix, "list", lambda: self.filesystem.get_file_info(selector))
        return {S3_SCHEME + i.path: i.size for i in infos if i.type == pafs.FileType.File}

    def list_files(self, uri_prefix: str) -> list[str]:
        return sorted(self._sizes_below(uri_prefix))

    def delete_tree(self, uri_prefix: str) -> None:
        key = self._key(uri_prefix)

        def delete() -> None:
            self.filesystem.delete_dir_contents(key, missing_dir_ok=True)
            with contextlib.suppress(OSError):  # S3 has no folders; MinIO-like stores may keep a marker
                self.filesystem.delete_dir(key)

        self._retrying(uri_prefix, "delete", delete)

    def _open_output(self, uri: str) -> AbstractContextManager[BinaryIO]:
        return _S3Writer(self, uri)


class _S3Writer:
    """A pyarrow output stream whose errors name the URI and hide credentials."""

    def __init__(self, store: S3ObjectStore, uri: str):
        self._store, self._uri = store, uri
        with store._errors(uri, "write"):
            self._out = store.filesystem.open_output_stream(store._key(uri))

    def write(self, data: bytes) -> int:
        with self._store._errors(self._uri, "write"):
            return self._out.write(data)

    def __enter__(self) -> _S3Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        with self._store._errors(self._uri, "write"):
            self._out.close()
            if exc_type is not None:  # pyarrow cannot abort an upload: close, then remove the partial object
                self._store.filesystem.delete_file(self._store._key(self._uri))


_S3_STORES: dict[tuple, S3ObjectStore] = {}
_S3_STORES_LOCK = threading.Lock()


def store_for(uri: str | Path, storage: StorageConfig | None = None) -> ObjectStore:
    """The store for ``uri``: S3 for ``s3://`` (one shared store per resolved storage config), else local."""
    if not is_s3_uri(str(uri)):
        return LocalObjectStore()
    resolved = (storage or StorageConfig()).resolved()
    key = tuple(vars(resolved).values())
    with _S3_STORES_LOCK:
        if key not in _S3_STORES:
            _S3_STORES[key] = S3ObjectStore(resolved)
        return _S3_STORES[key]
