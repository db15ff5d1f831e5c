"""The console of a `veason` command: our lines on the terminal, every library's output in the run's log file.

`open_console(cfg, command)` (each subcommand's `run`, right after loading its config) keeps the terminal for
our output and points everything else at `<run.output_dir>/logs/veason-<command>.log` (appended; for an s3://
output_dir a local folder, `<tmp>/veason_logs/<hash of the URI>/`): the Python streams and file descriptors 1
and 2, so vLLM, Ray, Ray Data, DeepSpeed, SAM2, transformers, wandb, Python warnings and C-level writes of this
process, and the worker lines Ray forwards to the driver (with their "(Actor pid=...)" prefix, no colour codes).

Ours: `say(...)` (print's arguments) writes to the console, `console_stream()` is the stream a progress bar
and the lines written around it (`tqdm.write(..., file=)`) use. In a Ray worker `say` marks its line, and the
driver's console shows it (without Ray's prefix) instead of the log file. With `run.verbose` (`--verbose`)
nothing is redirected: the libraries print on the console as they do without us.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from veason_ray.config import VeasonConfig

WORKER_MARK = "[veason] "  # a line `say` writes in a Ray worker: the driver's console shows it
LOGS_FOLDER = "logs"  # below run.output_dir
S3_LOGS_ROOT = "veason_logs"  # below the temporary folder, for an s3:// run.output_dir


def log_path(cfg: VeasonConfig, command: str) -> Path:
    """Where `command`'s third-party output goes: `<run.output_dir>/logs/veason-<command>.log`, or for an s3://
    run.output_dir a folder on this machine named by the URI's hash."""
    from veason_ray.object_store import is_s3_uri

    out = cfg.run.output_dir
    if is_s3_uri(out):
        folder = Path(tempfile.gettempdir()) / S3_LOGS_ROOT / hashlib.sha1(out.encode()).hexdigest()[:16]
    else:
        folder = Path(out) / LOGS_FOLDER
    return folder / f"veason-{command}.log"


class Console:
    """`out`/`err`: the terminal's stdout/stderr (our lines and progress bars, our error lines); `log`: the log
    file, None with `verbose` (nothing redirected)."""

    def __init__(self, command: str, log: Path | None) -> None:
        self.command, self.log_path = command, log
        self.log: TextIO | None = None
        self._saved_fds: dict[int, int] = {}
        self._saved_streams: tuple[Any, Any] | None = None
        if log is None:
            self.out, self.err = sys.stdout, sys.stderr
            return
        log.parent.mkdir(parents=True, exist_ok=True)
        self.out, self.err = _terminal(sys.stdout), _terminal(sys.stderr)
        self.log = open(log, "a", buffering=1, encoding="utf-8", errors="replace")
        self.log.write(f"==== veason {command} {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)}\n")
        self._redirect(self.log)

    @property
    def verbose(self) -> bool:
        return self.log is None

    def _redirect(self, log: TextIO) -> None:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd in (1, 2):
            self._saved_fds[fd] = os.dup(fd)
            os.dup2(log.fileno(), fd)
        # Streams not on fds 1 and 2 (pytest's capsys) would still reach the terminal: they are replaced.
        if not (_on_fd(sys.stdout, 1) and _on_fd(sys.stderr, 2)):
            self._saved_streams = (sys.stdout, sys.stderr)
            sys.stdout = sys.stderr = log
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray's forwarded lines without colour codes

    def close(self) -> None:
        """Give fds 1 and 2 and the Python streams back (idempotent). The log file stays open: Ray still sends
        the workers' last lines there when it shuts down."""
        for stream in (sys.stdout, sys.stderr, self.out, self.err):
            if not stream.closed:
                stream.flush()
        if self._saved_streams is not None:
            sys.stdout, sys.stderr = self._saved_streams
            self._saved_streams = None
        for fd, saved in self._saved_fds.items():
            os.dup2(saved, fd)
            os.close(saved)
        if self._saved_fds:
            for stream in (self.out, self.err):
                if stream not in (sys.stdout, sys.stderr):
                    stream.close()  # our duplicates of the terminal's descriptors
        self._saved_fds = {}


_current: Console | None = None  # the open console of this process, if any
# where the lines Ray forwards from workers go: the last console's log file (None: where Ray prints them)
_worker_log: TextIO | None = None


def open_console(cfg: VeasonConfig, command: str) -> Console:
    """The console of `veason <command>` (see the module's docstring); `close_console()` gives the terminal
    back (`veason`'s main does, and so does the end of the process)."""
    global _current, _worker_log
    close_console()
    _current = Console(command, None if cfg.run.verbose else log_path(cfg, command))
    _worker_log = _current.log
    _route_worker_lines()
    atexit.unregister(close_console)
    atexit.register(close_console)  # runs after the exit handlers the libraries register from now on
    if _current.log_path is not None:
        say(f"veason {command}: the libraries' output goes to {_current.log_path} (--verbose shows it here)")
    return _current


def current_console() -> Console | None:
    return _current


def close_console() -> None:
    global _current
    if _current is not None:
        _current.close()
        _current = None


def console_stream() -> TextIO:
    """Where our lines go: the open console's terminal, else stdout."""
    return _current.out if _current is not None else sys.stdout


def say(*values: object, sep: str = " ", end: str = "\n", err: bool = False) -> None:
    """`print` for our own lines: on the console (its stderr with `err`); in a Ray worker, marked for the
    driver's console."""
    if _current is None and _in_ray_worker():
        text = sep.join(str(v) for v in values)
        print("\n".join(WORKER_MARK + line for line in text.split("\n")), end=end, flush=True)
        return
    if _current is not None:
        stream = _current.err if err else _current.out
    else:
        stream = sys.stderr if err else sys.stdout
    print(*values, sep=sep, end=end, file=stream, flush=True)


def _terminal(stream: TextIO) -> TextIO:
    """A stream to where `stream` writes now that stays there when fds 1 and 2 are redirected."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return stream  # not on a file descriptor (pytest's capsys): it is not redirected either
    stream.flush()
    return open(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace")


def _on_fd(stream: TextIO, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):
        return False


def _in_ray_worker() -> bool:
    ray = sys.modules.get("ray")
    return (
        ray is not None and ray.is_initialized() and ray._private.worker.global_worker.mode == ray.WORKER_MODE
    )


def _route_worker_lines() -> None:
    """Ray's driver prints each batch of forwarded worker lines with `print_worker_logs(data, file, ...)`
    (ray/_private/worker.py, also at shutdown): wrap it once so that marked lines (ours) go to the console and
    the others to the log file, or where Ray meant them with a verbose console."""
    from ray._private import worker

    if getattr(worker.print_worker_logs, "veason_routed", False):
        return
    original = worker.print_worker_logs

    @functools.wraps(original)
    def print_worker_logs(data: dict[str, Any], print_file: Any, ignore_prefix: bool = False) -> None:
        lines = data.get("lines", [])
        ours = [line[len(WORKER_MARK) :] for line in lines if line.startswith(WORKER_MARK)]
        if ours and worker._worker_logs_enabled:
            say("\n".join(ours))
        theirs = [line for line in lines if not line.startswith(WORKER_MARK)]
        if theirs or not lines:
            original({**data, "lines": theirs}, _worker_log or print_file, ignore_prefix)

    print_worker_logs.veason_routed = True
    worker.print_worker_logs = print_worker_logs
