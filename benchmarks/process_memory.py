"""Memory of a local Ray cluster's processes over a long run, for the load and long-run benchmarks
(`benchmarks/serve_load.py --sustained`, `benchmarks/grpo_memory.py`) and their tests.

The processes are a root process (the Ray driver that started the cluster: `ray.init` makes GCS, the raylet
and through it every worker its descendants) and its descendants, each named by its process title: Ray titles
a worker `ray::<actor class>` (`ray::LearnerWorker`, `ray::ServeReplica:<app>:<deployment>`, `ray::ProxyActor`,
`ray::ServeController`; `ray::<class>.<method>` while a method runs, `ray::IDLE` for a pooled worker), and
other processes keep their executable's name (`raylet`, `gcs_server`, Ray's python helpers by script name).

Each sample records every process's RSS and USS (from its memory maps: the pages only that process maps, what
a leak adds; RSS also counts shared libraries and shared memory) against a progress count (requests answered,
steps taken), and the part of its USS that is Ray's object store: pages of the shared plasma file that only
this process maps now, such as objects it wrote whose readers are gone. Those come and go with the store's
objects, within its fixed size, and are no process's own memory. `summaries` gives, per process, the memory
at the first sample from a warm-up mark on, at the last, the peak, the least-squares slope of USS against
progress (MiB per progress unit), and the median USS less the store's pages over the first and the last
quarter of the samples (the growth the tests bound).

    memory = ProcessMemory(os.getpid(), root_label="driver")
    with memory.sampling(every_s=5.0, progress=lambda: answered):   # or memory.sample(step) by hand
        ...
    print(memory_table(memory.summaries(warmup), per=1000, unit="requests"))
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import psutil

MIB = 2**20
PLASMA = "/plasma"  # Ray's object store: a deleted file /dev/shm/plasmaXXXXXX (or in Ray's temp folder)
IDLE_TITLE = "ray::IDLE"


def process_title(process: psutil.Process) -> str:
    """What a process is: Ray's title without the running method (`ray::LearnerWorker.update` ->
    `ray::LearnerWorker`), a python helper's script or module name, or the executable's name."""
    command = process.cmdline()
    first = command[0] if command else process.name()
    if first.startswith("ray::"):
        return first.split(".", 1)[0]
    if os.path.basename(first).startswith("python"):
        if "-m" in command[1:-1]:
            return "python -m " + command[command.index("-m") + 1]
        script = next((part for part in command[1:] if part.endswith(".py")), "")
        return os.path.basename(script) or process.name()
    return process.name()


@dataclass
class MemorySeries:
    """One process's samples: progress and RSS / USS in bytes. The title is the latest one that is not
    `ray::IDLE` (a pooled worker becomes an actor)."""

    pid: int
    title: str
    progress: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    uss: list[int] = field(default_factory=list)
    store: list[int] = field(default_factory=list)  # of `uss`: Ray's object store pages


@dataclass(frozen=True)
class MemorySummary:
    """One process from the warm-up mark on, in MiB: USS at the first sample, the last, the peak; RSS at the
    last; the slope of USS and of RSS against progress (MiB per progress unit); samples used; the object
    store's pages in USS at the last; and the median USS less those pages over the first and over the last
    quarter of the samples (what a bound on growth compares: one sample may catch a transient allocation, a
    vLLM step or a weight push in flight)."""

    name: str
    pid: int
    uss_start: float
    uss_end: float
    uss_peak: float
    rss_end: float
    uss_slope: float
    rss_slope: float
    samples: int
    store_end: float
    own_first_quarter: float
    own_last_quarter: float


def _slope(x: list[float], y: list[int]) -> float:
    """Least-squares slope of y (bytes) against x, in MiB per x unit (0 with fewer than 2 distinct x)."""
    if len(set(x)) < 2:
        return 0.0
    return float(np.polyfit(np.asarray(x, dtype=float), np.asarray(y, dtype=float) / MIB, 1)[0])


class ProcessMemory:
    """Samples the memory of `root_pid` (named `root_label`) and its descendants. `ignore`: titles left out
    (Ray's pooled idle workers by default: they come and go and hold nothing of ours)."""

    def __init__(self, root_pid: int, root_label: str = "driver", ignore: tuple[str, ...] = (IDLE_TITLE,)):
        self.root = psutil.Process(root_pid)
        self.root_label = root_label
        self.ignore = ignore
        self.series: dict[int, MemorySeries] = {}
        self.timeline: list[tuple[float, float]] = []  # (time.monotonic(), progress) of each sample
        self._lock = threading.Lock()

    def processes(self) -> list[psutil.Process]:
        """The root and its descendants; none once the root has exited and been reaped."""
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def sample(self, progress: float) -> None:
        """One sample of every live process against `progress`; processes that exit meanwhile are skipped."""
        self.timeline.append((time.monotonic(), float(progress)))
        for process in self.processes():
            try:
                title = self.root_label if process.pid == self.root.pid else process_title(process)
                rss = process.memory_info().rss
                maps = process.memory_maps(grouped=True)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            uss = sum(m.private_clean + m.private_dirty for m in maps)
            store = sum(m.private_clean + m.private_dirty for m in maps if PLASMA in m.path)
            with self._lock:
                series = self.series.setdefault(process.pid, MemorySeries(process.pid, title))
                if title != IDLE_TITLE:
                    series.title = title
                series.progress.append(float(progress))
                series.rss.append(rss)
                series.uss.append(uss)
                series.store.append(store)

    @contextlib.contextmanager
    def sampling(self, every_s: float, progress: Callable[[], float]) -> Iterator[ProcessMemory]:
        """Samples every `every_s` seconds on a thread while the block runs, and once more at its end."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                self.sample(progress())
                stop.wait(every_s)

        thread = threading.Thread(target=loop, name="process-memory", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(60)
            self.sample(progress())

    def progress_after(self, seconds: float) -> float:
        """The progress at the first sample taken at least `seconds` after the first one (the last sample's
        when none was)."""
        first = self.timeline[0][0]
        return next((p for t, p in self.timeline if t - first >= seconds), self.timeline[-1][1])

    def summaries(self, warmup: float = 0.0, until: float = float("inf")) -> list[MemorySummary]:
        """Per process (not ignored, sampled at least twice at progress from `warmup` to `until`), sorted by
        title; a title shared by several processes gets their pids."""
        with self._lock:
            kept = [s for s in self.series.values() if s.title not in self.ignore]
        titles = [s.title for s in kept]
        rows = []
        for series in kept:
            picked = [i for i, p in enumerate(series.progress) if warmup <= p <= until]
            if len(picked) < 2:
                continue
            x = [series.progress[i] for i in picked]
            uss = [series.uss[i] for i in picked]
            rss = [series.rss[i] for i in picked]
            own = [series.uss[i] - series.store[i] for i in picked]
            quarter = max(len(own) // 4, 1)
            name = series.title if titles.count(series.title) == 1 else f"{series.title} ({series.pid})"
            rows.append(
                MemorySummary(
                    name=name,
                    pid=series.pid,
                    uss_start=uss[0] / MIB,
                    uss_end=uss[-1] / MIB,
                    uss_peak=max(uss) / MIB,
                    rss_end=rss[-1] / MIB,
                    uss_slope=_slope(x, uss),
                    rss_slope=_slope(x, rss),
                    samples=len(picked),
                    store_end=series.store[picked[-1]] / MIB,
                    own_first_quarter=float(np.median(own[:quarter])) / MIB,
                    own_last_quarter=float(np.median(own[-quarter:])) / MIB,
                )
            )
        return sorted(rows, key=lambda r: (r.name != self.root_label, r.name))


def memory_table(rows: list[MemorySummary], per: float, unit: str) -> str:
    """A markdown table of `rows`: USS after warm-up, at the end and peak, RSS at the end, the object store's
    pages in USS at the end (MiB), the growth of USS and RSS per `per` progress units (`unit`: "requests",
    "steps"), and the growth of USS less the store's pages between the medians of the first and last quarter."""
    growth = f"per {per:,.0f} {unit}"
    lines = [
        f"| process | pid | USS after warm-up MiB | USS end MiB | USS peak MiB | RSS end MiB | store in USS MiB "
        f"| USS growth MiB {growth} | RSS growth MiB {growth} | own USS, last - first quarter MiB | samples |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.pid} | {r.uss_start:.0f} | {r.uss_end:.0f} | {r.uss_peak:.0f} | {r.rss_end:.0f} "
            f"| {r.store_end:.0f} | {r.uss_slope * per:+.1f} | {r.rss_slope * per:+.1f} "
            f"| {r.own_last_quarter - r.own_first_quarter:+.1f} | {r.samples} |"
        )
    return "\n".join(lines)
