"""Where verl's time goes, seen from inside its Ray workers (issue 29): a stack sampler, and the setup hook that
starts it beside benchmarks/peer_verl_fixes.py's repair.

benchmarks/peer_grpo_step.py copies this file and peer_verl_fixes.py into `<work>/verl_fixes/` (on the path of
verl's processes), names `peer_verl_probe.setup` as Ray's `worker_process_setup_hook` and sets
PEER_VERL_PROBE_DIR. In each Ray worker, `setup` applies the repair and starts a daemon thread that every
`interval_s` looks at every other thread's stack and counts, per Ray task (the process title Ray gives a worker
while a method runs: `ray::WorkerDict.actor_rollout_ref_update_actor`), where the busy threads are: the innermost
verl function, the innermost transformers function and the innermost function of all. Threads waiting (in
threading, queue, selectors, asyncio's loop, Ray's task loop) are not counted. It writes `<dir>/<pid>.json` (the
profile, its task timeline with RSS and torch's GPU memory allocated, the repair's count) every 10 s and at each
change of task, replacing the file whole.

`read_probes`, `task_spans` and `summary_lines` are the reading side (peer_grpo_step.py, here, no verl): the
spans of each task and what its samples were doing. Only the standard library is imported at module level;
torch is looked at only where the process has imported it already.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

PROBE_DIR_ENV = "PEER_VERL_PROBE_DIR"
WAITING = (  # "file:function" of an innermost frame that waits (Ray's task loop waits in C under main_loop)
    "threading.py", "queue.py", "selectors.py", "asyncio/", "concurrent/futures/thread.py", "socket.py",
    "ray/_private/worker.py:main_loop",
)  # fmt: skip
IDLE = "ray::IDLE"


def task_title() -> str:
    """The process title: Ray's `ray::<class>.<method>` while a method runs, `ray::IDLE` in a pooled worker."""
    try:
        return Path("/proc/self/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace").strip()
    except OSError:
        return " ".join(sys.argv)


def rss_gib() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def gpu_allocated_gib() -> float:
    """torch's allocated CUDA memory in this process, if it has imported torch and started CUDA (0 if not)."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            return torch.cuda.memory_allocated() / 2**30
    except Exception:  # noqa: BLE001 - a probe never breaks the process it watches
        pass
    return 0.0


def where(frame) -> str | None:
    """`innermost verl function < innermost transformers function < innermost function` of a busy stack ("-"
    where none), None for a waiting one. GPU work shows where the CPU waits for it (a copy to the host, an
    item()), or where it queues kernels."""
    inner = frame
    if any(part in f"{inner.f_code.co_filename}:{inner.f_code.co_name}" for part in WAITING):
        return None
    found = {"/verl/": None, "/transformers/": None}
    while frame is not None:
        filename = frame.f_code.co_filename
        for package, seen in found.items():
            if seen is None and package in filename:
                found[package] = f"{filename.rsplit(package, 1)[1]}:{frame.f_code.co_name}"
        frame = frame.f_back
    name = f"{inner.f_code.co_filename.rsplit('/', 1)[-1]}:{inner.f_code.co_name}"
    return " < ".join([*(seen or "-" for seen in found.values()), name])


class StackSampler:
    """The daemon thread of the module docstring; `stop` ends it after a last write."""

    def __init__(self, directory: Path, interval_s: float = 1.0, write_every_s: float = 10.0) -> None:
        self.path = Path(directory) / f"{os.getpid()}.json"
        self.interval_s, self.write_every_s = interval_s, write_every_s
        self.profile: dict[str, Counter] = {}
        self.timeline: list[list] = []  # [wall time, title, RSS GiB, GPU GiB] at each change and every write
        self.started = time.time()
        self._stop = threading.Event()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.thread = threading.Thread(target=self._run, name="peer-verl-probe", daemon=True)
        self.thread.start()

    def sample(self) -> bool:
        """One look at every other thread; True when the task changed."""
        title = task_title()
        changed = not self.timeline or self.timeline[-1][1] != title
        counts = self.profile.setdefault(title, Counter())
        for ident, frame in sys._current_frames().items():
            if ident != threading.get_ident() and (key := where(frame)) is not None:
                counts[key] += 1
        counts["(samples)"] += 1
        if changed:
            self.timeline.append([time.time(), title, rss_gib(), gpu_allocated_gib()])
        return changed

    def write(self) -> None:
        fixes = sys.modules.get("peer_verl_fixes")
        record = {
            "pid": os.getpid(),
            "started": self.started,
            "interval_s": self.interval_s,
            "timeline": self.timeline,
            "profile": {title: dict(counts) for title, counts in self.profile.items()},
            "position_id_rebuilds": getattr(fixes, "REBUILDS", 0),
        }
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(record))
        partial.replace(self.path)

    def _run(self) -> None:
        last_write = 0.0
        while not self._stop.wait(self.interval_s):
            changed = self.sample()
            if changed or time.time() - last_write >= self.write_every_s:
                if not changed:  # the memory now, under the task that runs
                    self.timeline.append([time.time(), self.timeline[-1][1], rss_gib(), gpu_allocated_gib()])
                self.write()
                last_write = time.time()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=10)
        self.write()


def start(directory: str | os.PathLike | None = None, interval_s: float = 1.0) -> StackSampler | None:
    """A sampler writing under `directory` (default: $PEER_VERL_PROBE_DIR); None where neither names one."""
    directory = directory or os.environ.get(PROBE_DIR_ENV)
    return StackSampler(Path(directory), interval_s) if directory else None


def setup() -> None:
    """Ray's worker_process_setup_hook for verl's run: the repair of peer_verl_fixes.py, then the sampler."""
    import peer_verl_fixes  # beside this file in verl's processes (not this repository's package there)

    peer_verl_fixes.apply()
    start()


# the reading side


def read_probes(directory: Path) -> list[dict]:
    """Every probe file under `directory` (a file being replaced is skipped: its next write comes)."""
    probes = []
    for path in sorted(Path(directory).glob("*.json")):
        try:
            probes.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return probes


def task_spans(probe: dict) -> list[dict]:
    """The probe's tasks in order: title, start and end (wall), peak RSS and GPU GiB seen, samples."""
    spans: list[dict] = []
    for moment, title, rss, gpu in probe["timeline"]:
        if spans and spans[-1]["title"] == title:
            span = spans[-1]
            span.update(end=moment, rss=max(span["rss"], rss), gpu=max(span["gpu"], gpu))
            continue
        if spans:
            spans[-1]["end"] = moment
        spans.append({"title": title, "start": moment, "end": moment, "rss": rss, "gpu": gpu})
    return spans


def short(title: str) -> str:
    """`ray::WorkerDict.actor_rollout_ref_update_actor` -> `WorkerDict.actor_rollout_ref_update_actor`."""
    return title.removeprefix("ray::")


def summary_lines(probes: list[dict], since: float, min_span_s: float = 2.0, top: int = 6) -> list[str]:
    """Per process that ran a task for at least `min_span_s` (pooled idle time left out): its spans in
    seconds after `since` (wall), with peak RSS / GPU, then where each long task's samples were."""
    lines = []
    for probe in probes:
        spans = [s for s in task_spans(probe) if s["title"] != IDLE and s["end"] - s["start"] >= min_span_s]
        if not spans:
            continue
        rebuilds = probe.get("position_id_rebuilds", 0)
        lines.append(f"process {probe['pid']}" + (f" (position ids rebuilt {rebuilds}x)" if rebuilds else ""))
        for span in spans:
            lines.append(
                f"  {span['start'] - since:7.1f} - {span['end'] - since:7.1f} s  {short(span['title'])}: "
                f"{span['end'] - span['start']:.1f} s, RSS up to {span['rss']:.1f} GiB, "
                f"GPU {span['gpu']:.1f} GiB allocated"
            )
        for title in dict.fromkeys(s["title"] for s in spans if s["end"] - s["start"] >= 10 * min_span_s):
            counts = dict(probe["profile"].get(title, {}))
            samples = counts.pop("(samples)", 0)
            if not samples:
                continue
            lines.append(
                f"  where {short(title)}'s {samples} samples were (a sample counts each busy thread):"
            )
            for key, n in Counter(counts).most_common(top):
                lines.append(f"    {n / samples:5.0%}  {key}")
    return lines
