"""`veason serve` as an operator starts it, for the tests of the HTTP API and of the page: a subprocess on
127.0.0.1 with its own local Ray cluster, the tiny random policy on a vLLM engine (answers constrained to the
format, so they parse and carry boxes), the tiny SAM2, an API key, and video URLs read from the test S3 server.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import requests
from process_groups import stop_process_group

from actors.network import free_port

REPO = Path(__file__).resolve().parents[1]
API_KEY = "test-key-0123456789"


@dataclass(frozen=True)
class ServeServer:
    url: str
    api_key: str
    log: Path  # the driver's output
    ray_dir: Path  # its Ray cluster's temp folder (session logs under session_*/logs/)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def refused_video_url(self, query: str, video_url: str) -> dict:
        """POST /v1/segment with `video_url`; asserts a 422 naming `video_url` and returns its error."""
        response = requests.post(
            self.url + "/v1/segment",
            json={"query": query, "video_url": video_url},
            headers=self.headers,
            timeout=60,
        )
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["field"] == "video_url", error
        return error


def start_serve_server(folder: Path, storage, timeout_s: float = 420.0):
    """Start `veason serve` (yields a ServeServer once /v1/health/ready answers 200; stops it afterwards)."""
    from veason_ray.models.tiny_qwen import write_tiny_qwen
    from veason_ray.models.tiny_sam2 import write_tiny_sam2

    policy = write_tiny_qwen(folder / "qwen2_5_vl_tiny", seed=0)
    sam2 = write_tiny_sam2(folder / "sam2_tiny")
    port = free_port("127.0.0.1")
    ray_dir = Path(tempfile.mkdtemp(prefix="vs-", dir="/tmp"))  # short: Ray's socket paths must stay < 108
    command = [
        sys.executable, "-m", "pipelines.cli", "serve", "tests/configs/small.yaml", f"model.policy={policy}",
        f"reward.sam2.checkpoint={sam2}", f"run.output_dir={folder}", "reward.propagator=sam2", f"serve.port={port}",
        "inference.generator=vllm", "inference.constrain_answer=true", "inference.max_new_tokens=192",
        "inference.constrained_think_chars=16", "inference.constrained_max_boxes=2", "data.eval_num_frames=4",
        "serve.max_frames=40", "serve.max_side=640", "serve.max_upload_mb=4", "serve.max_duration_s=20",
        "serve.ingress.num_cpus=0.5", "serve.policy.num_cpus=0.5", "serve.masks.num_cpus=0.5",
        "placement.num_cpus=4", f"storage.endpoint_url={storage.endpoint_url}", f"storage.region={storage.region}",
        f"storage.access_key_id={storage.access_key_id}", f"storage.secret_access_key={storage.secret_access_key}",
    ]  # fmt: skip
    env = {
        **os.environ, "VEASON_API_KEY": API_KEY, "TQDM_DISABLE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO), "RAY_TMPDIR": str(ray_dir),
    }  # fmt: skip
    log = folder / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = ServeServer(f"http://127.0.0.1:{port}", API_KEY, log, ray_dir)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"veason serve exited with {process.returncode}:\n{log.read_text()[-4000:]}"
                )
            try:
                ready = requests.get(f"{server.url}/v1/health/ready", headers=server.headers, timeout=5)
                if ready.status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"veason serve not ready in {timeout_s} s:\n{log.read_text()[-4000:]}")
            time.sleep(1.0)
        yield server
    finally:
        stop_process_group(process, signal.SIGINT)  # veason serve shuts Serve and its Ray down on Ctrl-C
        shutil.rmtree(ray_dir, ignore_errors=True)
