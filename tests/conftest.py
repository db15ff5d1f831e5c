"""Shared fixtures: small synthetic datasets, a real S3-compatible server on 127.0.0.1 and a headless browser.

``s3_server`` is moto's ThreadedMotoServer (an HTTP S3 endpoint) started once per session on a free port;
it yields a StorageConfig pointing at it. ``s3_bucket`` creates a fresh bucket per test and yields its
``s3://`` URI. ``browser`` is Debian's headless chromium driven by selenium through chromedriver.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.network import free_port
from veason_ray.config import StorageConfig
from veason_ray.synth.writer import write_synthetic_dataset

SYNTH_SPEC = {"seed": 7, "num_videos": 6, "num_frames": 12, "height": 120, "width": 160}


@pytest.fixture(scope="session")
def synthetic_spec() -> dict:
    """How ``synthetic_revos`` and ``synthetic_reasonvos`` were written (seed, videos, frames, size)."""
    return dict(SYNTH_SPEC)


@pytest.fixture(scope="session")
def synthetic_revos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 videos x 12 frames at 160x120 in the ReVOS layout (4 train, 2 valid): see SYNTH_SPEC."""
    root = tmp_path_factory.mktemp("synthetic_revos")
    write_synthetic_dataset(root, layout="revos", valid_fraction=0.34, **SYNTH_SPEC)
    return root


@pytest.fixture(scope="session")
def synthetic_reasonvos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same 6 scenes as ``synthetic_revos`` in the ReasonVOS layout."""
    root = tmp_path_factory.mktemp("synthetic_reasonvos")
    write_synthetic_dataset(root, layout="reasonvos", **SYNTH_SPEC)
    return root


def as_mevis(revos: Path, out: Path, source_split: str = "train", split: str = "train") -> Path:
    """A ReVOS-layout dataset's `source_split` rearranged as MeViS ships a split (`<split>/JPEGImages`,
    `meta_expressions.json` without sizes or types, `mask_dict.json`); returns the MeViS root."""
    folder = out / split
    meta = json.loads((revos / f"meta_expressions_{source_split}_.json").read_text())
    for name, video in meta["videos"].items():
        shutil.copytree(revos / "JPEGImages" / name, folder / "JPEGImages" / name)
        del video["height"], video["width"]
        for exp in video["expressions"].values():
            del exp["type_id"]
    shutil.copy(revos / "mask_dict.json", folder / "mask_dict.json")
    (folder / "meta_expressions.json").write_text(json.dumps(meta))
    return out


@pytest.fixture(scope="session")
def synthetic_mevis(synthetic_revos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The valid videos of ``synthetic_revos`` as MeViS's ``valid_u`` split."""
    return as_mevis(synthetic_revos, tmp_path_factory.mktemp("synthetic_mevis"), "valid", "valid_u")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny random-init Qwen2.5-VL policy and SAM2 (256 px) folders."""
    from veason_ray.models.tiny_qwen import write_tiny_qwen
    from veason_ray.models.tiny_sam2 import write_tiny_sam2

    root = tmp_path_factory.mktemp("models")
    return write_tiny_qwen(root / "qwen2_5_vl_tiny", seed=0), write_tiny_sam2(
        root / "sam2_tiny", image_size=256
    )


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, synthetic_revos, tiny_models):
    """The uninterrupted GRPO run every fault of tests/faults/ is compared with (once per session)."""
    from grpo_runs import FaultRun, RunOutcome, grpo_command

    out = tmp_path_factory.mktemp("reference") / "run"
    run = FaultRun(grpo_command(out, synthetic_revos, tiny_models), out.parent / "run.log").start()
    assert run.finish() == 0, run.output[-3000:]
    return RunOutcome.read(out)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[StorageConfig]:
    """A moto S3 server on 127.0.0.1; yields the StorageConfig (endpoint, region, fake credentials)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    port = free_port("127.0.0.1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield StorageConfig(
            endpoint_url=f"http://127.0.0.1:{port}",
            region="us-east-1",
            access_key_id="test-access-key",
            secret_access_key="test-secret-key",
            max_attempts=2,
            connect_timeout_s=2.0,
            request_timeout_s=10.0,
        )
    finally:
        server.stop()


def create_bucket(storage: StorageConfig, name: str) -> None:
    """Create a bucket on the test server (with boto3, as an operator would; the product never does)."""
    import boto3

    boto3.client(
        "s3",
        endpoint_url=storage.endpoint_url,
        region_name=storage.region,
        aws_access_key_id=storage.access_key_id,
        aws_secret_access_key=storage.secret_access_key,
    ).create_bucket(Bucket=name)


@pytest.fixture
def s3_bucket(s3_server: StorageConfig) -> str:
    """A new empty bucket on the test server, as ``s3://<name>``."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    create_bucket(s3_server, name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A local Ray cluster (4 logical CPUs) for the tests of one module; shut down after them."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def pytest_configure(config: pytest.Config) -> None:
    # pycocotools 2.0.11's compiled decode calls np.array(copy=False) on an object without the numpy-2
    # __array__ signature: a harmless DeprecationWarning on every mask decode.
    config.addinivalue_line(
        "filterwarnings", "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
    )


@pytest.fixture(scope="session")
def serve_server(tmp_path_factory: pytest.TempPathFactory, s3_server: StorageConfig):
    """`veason serve` running on 127.0.0.1 (tests/serve_server.py), shared by the API and page tests."""
    from serve_server import start_serve_server

    yield from start_serve_server(tmp_path_factory.mktemp("serve"), s3_server)


BROWSER_SETUP_HINT = (
    "run `bash scripts/setup.sh` (it installs Debian's chromium and chromium-driver, and selenium)"
)


@pytest.fixture(scope="session")
def browser() -> Iterator:
    """A headless chromium (the system's, never a downloaded one) under selenium; fails with the setup hint
    when missing, skips with VEASON_SKIP_BROWSER=1."""
    if os.environ.get("VEASON_SKIP_BROWSER") == "1":
        pytest.skip("VEASON_SKIP_BROWSER=1")
    try:
        from selenium import webdriver
    except ImportError:
        pytest.fail(f"selenium is not installed: {BROWSER_SETUP_HINT}")
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        missing = [
            name for name, path in (("chromium", chromium), ("chromedriver", chromedriver)) if not path
        ]
        pytest.fail(f"{' and '.join(missing)} not on PATH: {BROWSER_SETUP_HINT}")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))
    try:
        yield driver
    finally:
        driver.quit()
