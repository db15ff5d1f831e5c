"""Benchmark: decoded-and-resized frames per second through the Ray Data frame stream (pipelines/frame_stream.py)
against a plain sequential Python loop over the same samples (veason_ray.sample_building.build_sample), in one
run, on 720p JPEG input; plus peak memory.

It writes a synthetic ReVOS-layout dataset at 1280x720 (JPEG quality 95), takes every expression of the train split
in evaluation sampling (8 evenly spaced frames each, so both sides decode exactly the same frames), then:
- loop: one process, one OpenCV thread, build_sample per expression;
- pipeline: a local Ray cluster with C CPUs, C decoding actors of 1 CPU each, for each C in --cpus.
Frames/s counts frames delivered to the consumer (each decoded from JPEG and resized to 560x560 once).
"wall" includes starting the decoding actors; "steady" runs from the first delivered sample to the last.
Peak RSS: the driver alone, and the sum over the driver and every Ray process it started (psutil, sampled every
50 ms; shared object-store pages count once per process that maps them, so the sum overstates).

    PYTHONPATH=. RAY_AUTH_MODE=disabled python benchmarks/ingest.py --cpus 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time

import cv2
import psutil
import ray

from pipelines.frame_stream import FrameStream, sampling_spec
from veason_ray.config import VeasonConfig
from veason_ray.datasets import open_dataset
from veason_ray.sample_building import build_sample
from veason_ray.synth.writer import write_synthetic_dataset


class PeakRSS:
    """Peak resident memory of this process and of this process plus all its descendants, sampled."""

    def __init__(self, every_s: float = 0.05):
        self.every_s, self.driver, self.total = every_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            try:
                own = me.memory_info().rss
                total = own + sum(c.memory_info().rss for c in me.children(recursive=True) if c.is_running())
            except psutil.Error:
                continue
            self.driver, self.total = max(self.driver, own), max(self.total, total)
            time.sleep(self.every_s)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_loop(cfg: VeasonConfig) -> dict:
    cv2.setNumThreads(1)
    dataset = open_dataset(cfg.data.dataset, cfg.data.root, cfg.data.train_split)
    spec = sampling_spec(cfg, "eval")
    records = list(dataset.expressions())
    frames = 0
    with PeakRSS() as peak:
        start = time.perf_counter()
        for record in records:
            frames += len(build_sample(dataset, record, spec).frame_indices)
        wall = time.perf_counter() - start
    return {"side": "loop", "cpus": 1, "samples": len(records), "frames": frames, "wall_s": wall,
            "steady_s": wall, "peak_driver_mb": peak.driver / 2**20, "peak_total_mb": peak.total / 2**20}  # fmt: skip


def run_pipeline(cfg: VeasonConfig, cpus: int) -> dict:
    cfg.data.decode_concurrency, cfg.data.decode_num_cpus = cpus, 1.0
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        stream = FrameStream(cfg, split=cfg.data.train_split, mode="eval")
        frames, first = 0, None
        with PeakRSS() as peak:
            start = time.perf_counter()
            for sample in stream:
                first = first or time.perf_counter()
                frames += len(sample.frame_indices)
            end = time.perf_counter()
    finally:
        ray.shutdown()
    return {"side": "pipeline", "cpus": cpus, "samples": stream.stats.samples, "frames": frames,
            "wall_s": end - start, "steady_s": end - first, "skipped": sum(stream.stats.skipped.values()),
            "peak_driver_mb": peak.driver / 2**20, "peak_total_mb": peak.total / 2**20}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--root", default="", help="dataset folder (default: a temporary one, written now)")
    parser.add_argument("--out", default="", help="also write the rows as JSON here")
    args = parser.parse_args()

    root = args.root or tempfile.mkdtemp(prefix="ingest-")
    if not os.path.exists(os.path.join(root, "mask_dict.json")):
        write_synthetic_dataset(root, layout="revos", seed=0, num_videos=args.videos, num_frames=args.frames,
                                height=args.height, width=args.width, valid_fraction=0.0)  # fmt: skip
    cfg = VeasonConfig()
    cfg.data.root, cfg.data.progress_every_s = root, 0
    print(
        f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} CPUs; input {args.width}x{args.height}"
    )
    print(
        "| side | CPUs | samples | frames | wall s | frames/s (wall) | frames/s/core (wall) | frames/s/core "
        "(steady) | vs loop | peak RSS driver MB | peak RSS all MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    rows: list[dict] = []
    for run in [lambda: run_loop(cfg)] + [lambda c=c: run_pipeline(cfg, c) for c in args.cpus]:
        r = run()
        rows.append(r)  # each row is printed as soon as it is measured: a cut-off run keeps what it measured
        fps, steady = r["frames"] / r["wall_s"], r["frames"] / r["steady_s"]
        base = rows[0]["frames"] / rows[0]["wall_s"]
        r.update(
            fps=fps, fps_per_core=fps / r["cpus"], steady_fps_per_core=steady / r["cpus"], ratio=fps / base
        )
        print(f"| {r['side']} | {r['cpus']} | {r['samples']} | {r['frames']} | {r['wall_s']:.2f} | {fps:.1f} | "
              f"{r['fps_per_core']:.1f} | {r['steady_fps_per_core']:.1f} | {r['ratio']:.2f}x | "
              f"{r['peak_driver_mb']:.0f} | {r['peak_total_mb']:.0f} |", flush=True)  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
