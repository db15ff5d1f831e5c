"""Load on the Serve app (`veason serve`, serve/): per concurrency level, N clients each sending segmentation
requests back to back; the requests/s, the client latency, the server's own stage seconds (the responses'
`seconds`) and Serve's overhead (client latency - `seconds.total`: HTTP, the proxy, routing, handle calls).

- Against a running deployment (`--url`): local videos uploaded to /v1/segment/upload (`--video`) and URLs the
  server fetches (`--video-url`, /v1/segment), cycled round-robin over the requests. With the variable that
  `--api-key-env` names set (VEASON_API_KEY), requests carry `Authorization: Bearer <key>`.
- Self-contained (`--start`): a synthetic video (moving shapes, 100 frames of 1280x720, an H.264 .mp4) and
  random-init models (Qwen2.5-VL with the 3B shapes, SAM2.1 hiera-large at 1024 px) written here, the app
  started in this process on a local Ray cluster with the policy and SAM2 sharing one GPU, measured, then shut
  down. Random weights never write a parsable answer, so decoding is constrained to the answer format
  (`inference.constrain_answer`): every answer has a keyframe and boxes, and SAM2 really runs.
  `--send upload,url` measures each level twice: the video uploaded through Serve's proxy, then fetched by the
  server from a loopback HTTP server started here (`serve.allow_private_urls=true`), which takes the upload's
  body out of the overhead.

On a machine with `nvidia-smi`, the GPU's busy fraction (NVML's utilisation: the share of time a kernel ran)
is sampled every 0.5 s during each level: at 1 client it bounds what concurrency can add (about 1 / busy).

Sustained (`--sustained SECONDS`): one level of `--clients` clients (default 4) for that long, the memory of the
server's processes (the Serve controller, proxy and replicas, Ray's own, and the driver: with `--start` this
process, which also runs the clients; with `--url`, `--server-pid` names a local server's root process) sampled
every `--memory-every` s (benchmarks/process_memory.py). Printed beside the latency table: per process, USS
and RSS from `--memory-warmup` s into the level (default a fifth of it) to the end, the peak, the growth per
1,000 requests (least-squares slope), and the growth of USS less Ray's object store pages between the medians
of the first and last quarter of the samples. `--distinct-videos K` uploads K different synthetic videos in
turn, so caches keyed by content (vLLM's multimodal processor cache) see new frames.

req/s counts the 2xx responses over the level's wall time (the last response included); latencies are of the
2xx responses. Goal (the issue): on one GPU, >= 6x the req/s of 1 client at 16 clients, overhead p50 <= 5 ms.
Serve's own cost without payload is measured apart: the round trip of the liveness route (no model, no body).

    python benchmarks/serve_load.py --start --out $OUT/serve_load.json      # one GPU (device tool)
    python benchmarks/serve_load.py --start --tiny --clients 1,2 --duration 15   # CPU check: tiny models
    python benchmarks/serve_load.py --url http://host:8000 --video a.mp4 --video-url https://host/b.mp4 \\
        --query "the dog about to jump" --clients 1,4,16 --duration 60 --warmup 4
    python benchmarks/serve_load.py --start serve.masks.max_batch_size=16    # trailing key=value: overrides
    python benchmarks/serve_load.py --start --tiny --sustained 300 --clients 4 --distinct-videos 64  # memory

--tiny runs on the CPU with this environment: RAY_AUTH_MODE=disabled OMP_NUM_THREADS=1
VLLM_CPU_OMP_THREADS_BIND=nobind VLLM_CPU_KVCACHE_SPACE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 HF_HUB_OFFLINE=1
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `benchmarks.*` when run as a script

import numpy as np  # noqa: E402
import requests  # noqa: E402

from actors.network import free_port  # noqa: E402
from benchmarks.evaluate import say, write_models  # noqa: E402
from benchmarks.process_memory import ProcessMemory, memory_table  # noqa: E402
from veason_ray.config import VeasonConfig  # noqa: E402

GOAL_RATIO = 6.0  # req/s at 16 clients over 1 client, one GPU
GOAL_OVERHEAD_MS = 5.0  # Serve's overhead p50
STAGES = ("read", "policy", "propagate", "encode", "total")
PROGRESS_EVERY_S = 20.0


@dataclass(frozen=True)
class Video:
    """What one request sends: an uploaded file's bytes (`data`) or a URL the server fetches."""

    name: str
    data: bytes | None = None
    url: str | None = None


@dataclass
class Outcome:
    """One request: client latency (seconds, send to the whole response read), HTTP status (0: no response),
    the error (status text or exception name, empty on 2xx), and the response's server-side fields."""

    latency_s: float
    status: int
    error: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    keyframe: int | None = None
    video: dict | None = None
    response_bytes: int = 0

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def send(
    session: requests.Session, base: str, headers: dict, video: Video, args: argparse.Namespace
) -> Outcome:
    options = {"masks": args.masks, **({"num_frames": args.num_frames} if args.num_frames else {})}
    start = time.perf_counter()
    try:
        if video.data is not None:
            response = session.post(
                f"{base}/v1/segment/upload",
                files={"file": (video.name, video.data, "video/mp4")},
                data={"query": args.query, **options},
                headers=headers,
                timeout=args.timeout,
            )
        else:
            body = {"query": args.query, "video_url": video.url, **options}
            response = session.post(f"{base}/v1/segment", json=body, headers=headers, timeout=args.timeout)
    except requests.RequestException as error:
        return Outcome(time.perf_counter() - start, 0, f"{type(error).__name__}: {error}"[:300])
    latency = time.perf_counter() - start
    if not 200 <= response.status_code < 300:
        return Outcome(latency, response.status_code, response.text[:300])
    body = response.json()
    return Outcome(
        latency,
        response.status_code,
        "",
        body["seconds"],
        body["keyframe"],
        body["video"],
        len(response.content),
    )


class GPUBusySampler:
    """The GPU's utilisation (percent of time a kernel ran, NVML via `nvidia-smi`) sampled every `every_s`
    while the block runs; `mean` is None where there is no `nvidia-smi`."""

    def __init__(self, every_s: float = 0.5):
        self.every_s = every_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> GPUBusySampler:
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _sample(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        while not self._stop.wait(self.every_s):
            try:
                out = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout.split()
                self.samples.append(float(out[0]))  # the first GPU: the one the app shares
            except (subprocess.SubprocessError, OSError, ValueError, IndexError):
                return

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


@contextlib.contextmanager
def served_files(paths: list[str]) -> Iterator[list[str]]:
    """The files over HTTP from a server on 127.0.0.1 (a thread of this process); yields their URLs."""
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    folder = Path(paths[0]).resolve().parent
    if any(Path(p).resolve().parent != folder for p in paths):
        raise SystemExit("--send url serves the --video files of one folder")

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield [f"http://127.0.0.1:{server.server_address[1]}/{Path(p).name}" for p in paths]
    finally:
        server.shutdown()
        thread.join(10)


def run_level(
    base: str,
    headers: dict,
    videos: list[Video],
    args: argparse.Namespace,
    clients: int,
    requests_n: int,
    outcomes: list[Outcome] | None = None,
) -> tuple[list[Outcome], float]:
    """`clients` threads sending back to back: `requests_n` requests in all, or (0) until `args.duration` has
    passed (requests in flight then finish). The outcomes (appended to `outcomes` as they come, when given)
    and the wall seconds to the last response."""
    counter = itertools.count()  # next() on it is atomic under the GIL: each request gets its own index
    outcomes = [] if outcomes is None else outcomes
    seen_errors: set[int] = set()
    start = time.perf_counter()
    deadline = start + args.duration

    def client() -> None:
        with requests.Session() as session:
            while True:
                index = next(counter)
                if (requests_n and index >= requests_n) or (
                    not requests_n and time.perf_counter() >= deadline
                ):
                    return
                outcome = send(session, base, headers, videos[index % len(videos)], args)
                outcomes.append(outcome)
                if not outcome.ok and outcome.status not in seen_errors:
                    seen_errors.add(outcome.status)  # the first error of each status, for the operator
                    say(f"  error {outcome.status or 'no response'}: {outcome.error}")

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    while alive := [thread for thread in threads if thread.is_alive()]:
        alive[0].join(PROGRESS_EVERY_S)
        if alive[0].is_alive():
            failed = sum(not o.ok for o in outcomes)
            say(f"  {clients} clients: {len(outcomes)} responses so far, {failed} errors")
    return outcomes, time.perf_counter() - start


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def summarize(
    clients: int, outcomes: list[Outcome], wall_s: float, send: str = "", gpu_busy: float | None = None
) -> dict:
    ok = [o for o in outcomes if o.ok]
    latency = [o.latency_s for o in ok]
    errors = Counter(str(o.status) if o.status else o.error.split(":")[0] for o in outcomes if not o.ok)
    stages = {s: _mean([o.seconds[s] for o in ok if s in o.seconds]) for s in STAGES}
    model = [
        o.seconds["policy"] + o.seconds["propagate"]
        for o in ok
        if {"policy", "propagate"} <= o.seconds.keys()
    ]
    overhead = [o.latency_s - o.seconds["total"] for o in ok if "total" in o.seconds]
    return {
        "clients": clients,
        "send": send,
        "gpu_busy_pct": gpu_busy,
        "requests": len(outcomes),
        "ok": len(ok),
        "errors": dict(errors),
        "with_keyframe": sum(o.keyframe is not None for o in ok),
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "latency_s": {f"p{q}": _percentile(latency, q) for q in (50, 95, 99)},
        "server_stage_s": stages,
        "model_s": _mean(model),
        "response_mib": _mean([o.response_bytes / 2**20 for o in ok]),
        "overhead_ms": {f"p{q}": None if not overhead else 1000 * _percentile(overhead, q) for q in (50, 95)},
        "outcomes": [asdict(o) for o in outcomes],
    }


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def speedup(levels: list[dict]) -> tuple[dict, dict, float | None]:
    """The lowest and highest level (of the first way of sending) and the ratio of their req/s."""
    levels = [r for r in levels if r["send"] == levels[0]["send"]]
    low, high = min(levels, key=lambda r: r["clients"]), max(levels, key=lambda r: r["clients"])
    ratio = high["requests_per_s"] / low["requests_per_s"] if low["requests_per_s"] else None
    return low, high, ratio


def table(levels: list[dict], device: str, setup: list[str]) -> str:
    lines = [
        f"\nServe load on {device}",
        *setup,
        "",
        "| video sent as | clients | requests | errors | req/s | p50 s | p95 s | p99 s "
        "| model s (policy+propagate) | server total s | Serve overhead p50 ms | response MiB | GPU busy % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in levels:
        errors = ", ".join(f"{n}x {kind}" for kind, n in r["errors"].items()) or "0"
        lat = r["latency_s"]
        lines.append(
            f"| {r['send']} | {r['clients']} | {r['requests']} | {errors} | {r['requests_per_s']:.3f} "
            f"| {_f(lat['p50'], '.3f')} | {_f(lat['p95'], '.3f')} | {_f(lat['p99'], '.3f')} "
            f"| {_f(r['model_s'], '.3f')} | {_f(r['server_stage_s']['total'], '.3f')} "
            f"| {_f(r['overhead_ms']['p50'], '.1f')} | {_f(r['response_mib'], '.2f')} | {_f(r['gpu_busy_pct'], '.0f')} |"
        )
    lines += [
        "",
        "mean server seconds by stage",
        "",
        "| video sent as | clients | " + " | ".join(STAGES) + " |",
    ]
    lines.append("|---|---:|" + "---:|" * len(STAGES))
    for r in levels:
        lines.append(
            f"| {r['send']} | {r['clients']} | "
            + " | ".join(_f(r["server_stage_s"][s], ".3f") for s in STAGES)
            + " |"
        )
    low, high, ratio = speedup(levels)
    worst = max((r["overhead_ms"]["p50"] or 0.0 for r in levels), default=0.0)
    lines += [
        "",
        f"Serve overhead p50 at most {worst:.1f} ms (goal <= {GOAL_OVERHEAD_MS:.0f} ms)"
        if low is high
        else f"req/s at {high['clients']} clients / at {low['clients']} ({low['send']}): {_f(ratio, '.2f')}x (goal >= {GOAL_RATIO:.0f}x "
        f"at 16 clients on one GPU); Serve overhead p50 at most {worst:.1f} ms (goal <= {GOAL_OVERHEAD_MS:.0f} ms)",
        "answers with a keyframe (SAM2 ran): "
        + ", ".join(f"{r['with_keyframe']}/{r['ok']} at {r['clients']}" for r in levels),
    ]
    if low["gpu_busy_pct"]:
        lines.append(
            f"GPU busy {low['gpu_busy_pct']:.0f}% at {low['clients']} client(s): concurrency can add at most about "
            f"{100 / low['gpu_busy_pct']:.1f}x before batching gains"
        )
    return "\n".join(lines)


# ---- the self-contained app (--start) ----


def write_synthetic_video(path: Path, frames: int, height: int, width: int, seed: int, fps: int = 10) -> Path:
    """An H.264 .mp4 of the synthetic world's moving, occluding shapes on its gradient backdrop, with a light
    film grain (sigma 3 levels): flat shapes alone compress 15x smaller than camera footage of the same size,
    and the upload and the decoding would then cost less than a real video's."""
    import av

    from veason_ray.synth import WorldConfig, simulate_scene

    rng = np.random.default_rng(seed)
    scene = simulate_scene(rng, WorldConfig(height=height, width=width, num_frames=frames, max_objects=4))
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for t in range(frames):
            grain = rng.normal(0.0, 3.0, (height, width, 1))
            image = np.clip(scene.render(t) + grain, 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def build_config(
    args: argparse.Namespace, policy: Path, sam2: Path, sam2_config: str, port: int
) -> VeasonConfig:
    from veason_ray.config_loading import load_config

    overrides = [
        f"model.policy={policy}",
        f"reward.sam2.checkpoint={sam2}",
        f"reward.sam2.config={sam2_config}",
        "reward.propagator=sam2",
        "inference.generator=vllm",
        "inference.constrain_answer=true",
        f"inference.constrained_think_chars={args.think_chars}",
        "inference.constrained_max_boxes=4",
        f"data.eval_num_frames={args.num_frames}",
        "serve.host=127.0.0.1",
        f"serve.port={port}",
        f"serve.api_key_env={args.api_key_env}",
        "run.seed=0",
    ]
    if args.tiny:
        base = "configs/demo.yaml"
        overrides += ["inference.max_new_tokens=256", "reward.sam2.image_size=256"]
    else:
        base = (
            "configs/serve-3b-1gpu.yaml"  # what an operator deploys on one GPU: its GPU shares and batching
        )
        overrides += ["inference.max_new_tokens=1024", "model.dtype=bfloat16"]
    return load_config(str(REPO / base), overrides + list(args.overrides))


def wait_ready(base: str, headers: dict, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ready = requests.get(f"{base}/v1/health/ready", headers=headers, timeout=15)
            if ready.status_code == 200:
                return
            detail = f"{ready.status_code} {ready.text[:200]}"
        except requests.RequestException as error:
            detail = type(error).__name__
        if time.monotonic() > deadline:
            raise SystemExit(
                f"{base}/v1/health/ready did not answer 200 in {timeout_s:.0f} s (last: {detail})"
            )
        time.sleep(2.0)


@contextlib.contextmanager
def started_app(args: argparse.Namespace, work: Path) -> Iterator[str]:
    """The app on a local Ray cluster (this process is its driver); yields its URL, shuts Serve and Ray down."""
    import ray
    from ray import serve

    from serve.app import build_app

    policy, sam2, sam2_config = write_models(args, work)
    say(f"models written: {policy.name}, {sam2.name}")
    cfg = build_config(args, policy, sam2, sam2_config, free_port("127.0.0.1"))
    ray.init(
        num_cpus=cfg.placement.num_cpus or None,
        num_gpus=cfg.placement.num_gpus or None,
        include_dashboard=False,
        log_to_driver=False,  # the replicas' (vLLM's, SAM2's) logs stay in Ray's session folder
    )
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    try:
        serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
        say(f"Serve: deploying {cfg.serve.app_name} (the models load in the replicas)")
        serve.run(build_app(cfg), name=cfg.serve.app_name, route_prefix=cfg.serve.route_prefix)
        yield f"http://{cfg.serve.host}:{cfg.serve.port}{cfg.serve.route_prefix.rstrip('/')}"
    finally:
        say("Serve: shutting down")
        serve.shutdown()
        ray.shutdown()


# ---- main ----


def load_videos(args: argparse.Namespace) -> list[Video]:
    videos = [Video(Path(p).name, data=Path(p).read_bytes()) for p in args.video]
    return videos + [Video(url.rsplit("/", 1)[-1], url=url) for url in args.video_url]


def empty_round_trip_ms(base: str, headers: dict, count: int = 50) -> float:
    """Serve's own cost of a request: p50 of `count` GETs of the liveness route (proxy, routing, the ingress
    replica, no model, no payload), one after another."""
    times = []
    with requests.Session() as session:
        for _ in range(count):
            start = time.perf_counter()
            session.get(f"{base}/v1/health/live", headers=headers, timeout=30).raise_for_status()
            times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def measure(
    base: str, headers: dict, videos: list[Video], args: argparse.Namespace, send: str = ""
) -> list[dict]:
    clients = sorted({int(c) for c in args.clients.split(",")})
    if args.warmup:
        say(f"warm-up: {args.warmup} requests")
        run_level(base, headers, videos, args, min(args.warmup, clients[-1]), args.warmup)
    levels = []
    for count in clients:
        what = f"{args.requests} requests" if args.requests else f"{args.duration:.0f} s"
        say(f"level: {count} clients, {what}{f', video as {send}' if send else ''}")
        with GPUBusySampler() as gpu:
            outcomes, wall = run_level(base, headers, videos, args, count, args.requests)
        level = summarize(count, outcomes, wall, send, gpu.mean)
        levels.append(level)
        say(
            f"level {count}: {level['ok']}/{level['requests']} ok, {level['requests_per_s']:.3f} req/s, "
            f"p50 {_f(level['latency_s']['p50'], '.3f')} s, overhead p50 {_f(level['overhead_ms']['p50'], '.1f')} ms"
            + (f", GPU busy {gpu.mean:.0f}%" if gpu.mean is not None else "")
        )
    return levels


# ---- sustained load and the server's memory (--sustained) ----


def sustained(
    base: str, headers: dict, videos: list[Video], args: argparse.Namespace, memory: ProcessMemory | None
) -> tuple[dict, dict | None]:
    """`args.clients` clients for `args.sustained` seconds after `args.warmup` requests, the server's processes
    (`memory`) sampled every `args.memory_every` s against the responses received. Returns the level and the
    memory figures (None without `memory`): per process from `args.memory_warmup` s into the level on."""
    clients = int(args.clients)
    if args.warmup:
        say(f"warm-up: {args.warmup} requests")
        run_level(base, headers, videos, args, min(args.warmup, clients), args.warmup)
    say(f"sustained: {clients} clients for {args.sustained:.0f} s, {len(videos)} distinct video(s)")
    outcomes: list[Outcome] = []
    sampling = (
        memory.sampling(args.memory_every, lambda: len(outcomes)) if memory else contextlib.nullcontext()
    )
    with sampling, GPUBusySampler() as gpu:
        outcomes, wall = run_level(base, headers, videos, args, clients, 0, outcomes)
    level = summarize(clients, outcomes, wall, "sustained", gpu.mean)
    if memory is None:
        return level, None
    warm = memory.progress_after(args.memory_warmup)
    rows = memory.summaries(warm)
    return level, {
        "warmup_s": args.memory_warmup,
        "warmup_requests": warm,
        "requests": len(outcomes),
        "processes": [asdict(row) for row in rows],
        "series": [asdict(series) for series in memory.series.values()],
        "table": memory_table(rows, per=1000, unit="requests"),
        "largest_uss_growth_per_1000": max(rows, key=lambda r: r.uss_slope).uss_slope * 1000,
    }


def memory_text(figures: dict, level: dict) -> str:
    largest = max(figures["processes"], key=lambda r: r["uss_slope"])
    return "\n".join(
        [
            f"\nmemory of the server's processes, from {figures['warmup_s']:.0f} s into the level "
            f"(response {figures['warmup_requests']:.0f}) to the end (response {figures['requests']})",
            "",
            figures["table"],
            "",
            f"largest USS growth: {largest['name']} {largest['uss_slope'] * 1000:+.1f} MiB per 1,000 requests "
            f"(a response is {_f(level['response_mib'], '.3f')} MiB)",
        ]
    )


def describe_setup(
    args: argparse.Namespace, videos: list[Video], levels: list[dict], model: str
) -> list[str]:
    shapes = sorted(
        {f"{o['video']['frames']} frames of {o['video']['width']}x{o['video']['height']}"
         for r in levels for o in r["outcomes"] if o["video"]}
    )  # fmt: skip
    sizes = ", ".join(f"{v.name} {len(v.data) / 2**20:.2f} MiB" for v in videos if v.data is not None)
    lines = [
        f"videos: {len(videos)} ({'; '.join(shapes) or 'no response'}){f'; uploads: {sizes}' if sizes else ''}",
        f"sampled frames: {args.num_frames or 'server default'}; masks={args.masks}; policy: {model}",
    ]
    if args.start:
        lines.append(
            f"models: Qwen2.5-VL {'tiny' if args.tiny else '3B shapes'} (random init, constrained answers); "
            f"SAM2: {'tiny 256 px' if args.tiny else 'SAM2.1 hiera-large 1024 px'} (random init)"
        )
    return lines


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running deployment, e.g. http://host:8000 (with any route prefix)")
    target.add_argument("--start", action="store_true", help="write models and a video, start the app here")
    parser.add_argument(
        "--tiny", action="store_true", help="with --start: tiny models on the CPU, small video"
    )
    parser.add_argument("--api-key-env", default="VEASON_API_KEY", help="the variable holding the API key")
    parser.add_argument("--video", action="append", default=[], help="a local video to upload (repeatable)")
    parser.add_argument(
        "--video-url", action="append", default=[], help="a URL the server fetches (repeatable)"
    )
    parser.add_argument("--query", default="the shape that moves the fastest")
    parser.add_argument(
        "--clients", default=None, help="concurrency levels, comma separated (1,4,16; --sustained: one, 4)"
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per level")
    parser.add_argument("--requests", type=int, default=0, help="requests per level instead of --duration")
    parser.add_argument("--warmup", type=int, default=2, help="requests before the first level")
    parser.add_argument(
        "--num-frames", type=int, default=None, help="frames the policy sees (server default)"
    )
    parser.add_argument("--masks", choices=("rle", "none"), default="rle")
    parser.add_argument(
        "--send",
        default="upload",
        help="--start: how the video travels, comma separated, each measured in turn: upload, url",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take")
    parser.add_argument("--ready-timeout", type=float, default=900.0, help="seconds for the app to be ready")
    parser.add_argument("--frames", type=int, default=100, help="--start: frames of the synthetic video")
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument(
        "--think-chars", type=int, default=128, help="--start: longest constrained think text"
    )
    parser.add_argument(
        "--sustained", type=float, default=0.0, help="one level this long (s), memory sampled"
    )
    parser.add_argument("--memory-every", type=float, default=5.0, help="--sustained: seconds a sample")
    parser.add_argument("--memory-warmup", type=float, help="--sustained: seconds before memory counts")
    parser.add_argument(
        "--server-pid", type=int, default=0, help="--url --sustained: server process to sample"
    )
    parser.add_argument("--distinct-videos", type=int, default=1, help="--start: synthetic videos, cycled")
    parser.add_argument("--out", default="", help="a JSON file for the figures and every request")
    parser.add_argument("overrides", nargs="*", help="--start: config key=value overrides")
    args = parser.parse_args()
    if args.sustained:
        args.clients = args.clients or "4"
        if "," in args.clients:
            parser.error("--sustained runs one level: give one --clients count")
        if args.send != "upload":
            parser.error("--sustained sends uploads")
        args.duration = args.sustained
        args.memory_warmup = args.sustained / 5 if args.memory_warmup is None else args.memory_warmup
    args.clients = args.clients or "1,4,16"
    if not args.start and not (args.video or args.video_url):
        parser.error("--url needs at least one --video or --video-url")
    args.send = [way.strip() for way in args.send.split(",") if way.strip()]
    if not args.send or set(args.send) - {"upload", "url"}:
        parser.error("--send takes upload, url or both (comma separated)")
    if not args.start and args.send != ["upload"]:
        parser.error("--send is for --start; with --url, pass --video (uploads) and --video-url (fetched)")
    if "url" in args.send:
        args.overrides.append("serve.allow_private_urls=true")  # the loopback server of --send url
    if args.start:
        args.num_frames = args.num_frames or (4 if args.tiny else 8)
        if args.tiny:
            args.frames, args.height, args.width = min(args.frames, 24), 240, 320
            args.think_chars = 16
    return args


def main() -> int:
    args = parse_args()
    key = os.environ.get(args.api_key_env, "") if args.api_key_env else ""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    work = Path(tempfile.mkdtemp(prefix="serve_load_"))
    if args.start and not (args.video or args.video_url):
        paths = [
            write_synthetic_video(work / f"synthetic_{seed}.mp4", args.frames, args.height, args.width, seed)
            for seed in range(args.distinct_videos)
        ]
        args.video = [str(path) for path in paths]
        say(
            f"{len(paths)} video(s) written: {args.frames} frames of {args.width}x{args.height}, "
            f"{paths[0].stat().st_size / 2**20:.2f} MiB"
        )
    videos = load_videos(args)
    memory_figures = None
    with started_app(args, work) if args.start else contextlib.nullcontext(args.url.rstrip("/")) as base:
        wait_ready(base, headers, args.ready_timeout)
        info = requests.get(f"{base}/v1/info", headers=headers, timeout=30).json()
        model = f"{info['model']['name']} ({info['model']['version']})"
        say(f"server ready: {model}; limits {info['limits']}")
        round_trip_ms = empty_round_trip_ms(base, headers)
        say(f"Serve round trip of an empty route (GET /v1/health/live): p50 {round_trip_ms:.1f} ms")
        if args.sustained:
            server = os.getpid() if args.start else args.server_pid
            label = "driver (and clients)" if args.start else "server root"
            memory = ProcessMemory(server, label) if server else None
            if memory is None:
                say("no --server-pid: the server's memory is not sampled")
            level, memory_figures = sustained(base, headers, videos, args, memory)
            levels = [level]
        else:
            levels = [] if args.start else measure(base, headers, videos, args, "as given")
        for way in args.send if args.start and not args.sustained else []:
            if way == "upload":
                levels += measure(base, headers, videos, args, way)
                continue
            with served_files(args.video) as urls:
                fetched = [Video(Path(url).name, url=url) for url in urls]
                levels += measure(base, headers, fetched, args, way)
    if args.start:
        import torch

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    else:
        device = f"the deployment at {args.url}"
    setup = describe_setup(args, videos, levels, model)
    setup.append(
        f"Serve round trip of an empty route (GET /v1/health/live, 50 in a row): p50 {round_trip_ms:.1f} ms"
    )
    text = table(levels, device, setup)
    if memory_figures:
        text += "\n" + memory_text(memory_figures, levels[0])
    print(text, flush=True)
    if args.out:
        low, high, ratio = speedup(levels)
        doc = {
            "device": device,
            "setup": setup,
            "args": {k: v for k, v in vars(args).items() if k != "overrides"},
            "overrides": list(args.overrides),
            "ratio": {
                "low_clients": low["clients"],
                "high_clients": high["clients"],
                "requests_per_s": ratio,
            },
            "goals": {"ratio": GOAL_RATIO, "overhead_ms": GOAL_OVERHEAD_MS},
            "empty_round_trip_ms": round_trip_ms,
            "levels": levels,
            "memory": memory_figures,
            "table": text,
        }
        Path(args.out).write_text(json.dumps(doc, indent=2, default=str))
        say(f"wrote {args.out}")
    return 0 if all(r["ok"] for r in levels) else 1


if __name__ == "__main__":
    raise SystemExit(main())
