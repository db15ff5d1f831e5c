"""The jobs of README's "Try the jobs on one machine", as written: a local head (`ray start --head`), the demo's
GRPO and eval jobs submitted with `ray job submit --working-dir .`, data, models and every output in a moto S3
bucket on 127.0.0.1. Each job is stopped halfway once (`ray job stop`) and submitted again: it resumes and
finishes, and its outputs in the bucket are whole. The head is stopped at the end, also when the test fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import create_bucket
from process_groups import stop_process_group

from actors.network import free_port
from veason_ray.config import StorageConfig
from veason_ray.config_loading import load_config
from veason_ray.evaluation import ExpressionResult
from veason_ray.object_store import join_uri, store_for
from veason_ray.training.checkpoint import COMPLETE_MARKER, checkpoint_tag

pytestmark = pytest.mark.slow  # two GRPO and three eval jobs on a local head: about 5 minutes on 2 cores

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment's `ray` and `veason`
SECTION = "### Try the jobs on one machine"
JOB_S = 600.0  # the deadline of one job


def readme_job_commands() -> dict[str, str]:
    """README's `ray job submit` commands of the section, by program (grpo, eval), continuation lines joined."""
    text = (REPO / "README.md").read_text()
    block = text.split(SECTION, 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.startswith("ray job submit")]
    return {re.search(r" -- veason (\w+) ", c).group(1): " ".join(c.split()) for c in commands}


@pytest.fixture
def ray_head() -> Iterator[str]:
    """`ray start --head --block` in its own process group and temp folder (other tests' clusters untouched);
    yields the dashboard address; the whole group is stopped afterwards, also on failure."""
    temp = Path(tempfile.mkdtemp(prefix="vj-", dir="/tmp"))  # short: Ray's socket paths must stay < 108
    dashboard = free_port("127.0.0.1")
    env = {
        **os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled", "TQDM_DISABLE": "1",
        "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1",
    }  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "8", "--port", str(free_port("127.0.0.1")),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--temp-dir", str(temp),
         "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, f"ray start --head exited with {head.returncode}"
            try:
                if requests.get(f"{address}/api/version", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the head's dashboard did not answer in 120 s"
            time.sleep(1.0)
        wait_for_job_agent(address, deadline + 120)
        yield address
    finally:
        stop_process_group(head)  # `--block` stops the head's processes when it is terminated
        shutil.rmtree(temp, ignore_errors=True)


def wait_for_job_agent(address: str, deadline: float) -> None:
    """The dashboard answers before the node's job agent has registered ("No available agent to submit job"):
    submit a no-op job until one is accepted and has run."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    while True:
        try:
            job = client.submit_job(entrypoint="true")
            break
        except RuntimeError as error:
            assert time.monotonic() < deadline, f"the head's job agent never took a job: {error}"
            time.sleep(1.0)
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED}:
        assert time.monotonic() < deadline, f"the no-op job is still {status}"
        time.sleep(0.5)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job)


def _env(address: str, bucket: str, storage: StorageConfig) -> dict[str, str]:
    """README's variables, pointing at the local head and the moto bucket."""
    job_env = {
        "AWS_ENDPOINT_URL": storage.endpoint_url, "AWS_REGION": storage.region,
        "AWS_ACCESS_KEY_ID": storage.access_key_id, "AWS_SECRET_ACCESS_KEY": storage.secret_access_key,
    }  # fmt: skip
    return {
        **os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_ADDRESS": address, "BUCKET": bucket,
        "JOB_ENV": json.dumps({"env_vars": job_env}),
    }  # fmt: skip


def submit(command: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    """README's command through a shell (its variables expanded as a user's shell would); output to `log`."""
    with log.open("w") as out:
        return subprocess.Popen(
            ["bash", "-c", command],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def finish(process: subprocess.Popen, log: Path) -> str:
    try:
        process.wait(timeout=JOB_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"job not done in {JOB_S:.0f} s:\n{log.read_text()[-4000:]}") from None
    text = log.read_text()
    assert process.returncode == 0, f"ray job submit exited with {process.returncode}:\n{text[-6000:]}"
    return text


def stop_when(condition, process: subprocess.Popen, log: Path, address: str, env: dict[str, str]) -> str:
    """Wait for `condition()` (the job halfway), then `ray job stop` the running job; returns its id."""
    deadline = time.monotonic() + JOB_S
    while not condition():
        assert process.poll() is None, f"the job ended before it was stopped:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"the job never got halfway:\n{log.read_text()[-4000:]}"
        time.sleep(0.5)
    job_id = re.search(r"Job '([^']+)' submitted successfully", log.read_text()).group(1)
    stop = subprocess.run(
        [str(BIN / "ray"), "job", "stop", "--address", address, job_id],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert stop.returncode == 0, stop.stdout + stop.stderr
    process.wait(timeout=120)
    status = subprocess.run(
        [str(BIN / "ray"), "job", "status", "--address", address, job_id],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "was stopped" in status.stdout, status.stdout + status.stderr
    return job_id


def jsonl(store, uri: str) -> list[dict]:
    return [json.loads(line) for line in store.read_bytes(uri).decode().splitlines() if line]


def write_demo_inputs(folder: Path) -> tuple[Path, Path, Path, int]:
    """What `make demo` writes under runs/demo (the data of configs/demo.yaml's data.synth, the tiny models),
    and the number of expressions the demo's evaluation scores."""
    from veason_ray.datasets import open_dataset
    from veason_ray.models.tiny_qwen import write_tiny_qwen
    from veason_ray.models.tiny_sam2 import write_tiny_sam2
    from veason_ray.synth.writer import write_synthetic_dataset

    cfg = load_config("configs/demo.yaml")
    synth = cfg.data.synth
    write_synthetic_dataset(
        folder / "revos", num_videos=synth.videos, num_frames=synth.frames, height=synth.height,
        width=synth.width, seed=synth.seed, valid_fraction=synth.valid_fraction, min_objects=synth.min_objects,
        max_objects=synth.max_objects,
    )  # fmt: skip
    expressions = len(list(open_dataset("revos", str(folder / "revos"), cfg.data.eval_split).expressions()))
    qwen = write_tiny_qwen(folder / "qwen2_5_vl_tiny", seed=0)
    return (
        folder / "revos",
        qwen,
        write_tiny_sam2(folder / "sam2_tiny"),
        min(expressions, cfg.eval.max_expressions),
    )


def test_readme_jobs_run_stop_and_resume_on_a_local_head(
    ray_head: str, s3_server: StorageConfig, tmp_path: Path
):

    commands = readme_job_commands()
    assert set(commands) == {"grpo", "eval"}, commands
    name = f"jobs-{os.getpid()}"
    create_bucket(s3_server, name)
    bucket = f"s3://{name}/veason"
    store = store_for(bucket, s3_server)
    # the README's `aws s3 sync` of runs/demo/data and runs/demo/models
    data, qwen, sam2, expressions = write_demo_inputs(tmp_path / "demo")
    store.upload_tree(data, join_uri(bucket, "data/revos"))
    store.upload_tree(qwen, join_uri(bucket, "models/qwen2_5_vl_tiny"))
    store.upload_tree(sam2, join_uri(bucket, "models/sam2_tiny"))
    env = _env(ray_head, bucket, s3_server)
    run = join_uri(bucket, "runs/demo")

    # GRPO: stopped once its step-2 checkpoint is complete, then submitted again: it resumes there and finishes
    # the README's command, shortened to 4 steps with a checkpoint every 2 (the demo trains 20, saving every 10)
    grpo = commands["grpo"] + " trainer.steps=4 trainer.save_every=2"
    first = submit(grpo, env, tmp_path / "grpo-1.log")
    checkpoint = join_uri(run, "checkpoints", checkpoint_tag(2), COMPLETE_MARKER)
    stop_when(lambda: store.exists(checkpoint), first, tmp_path / "grpo-1.log", ray_head, env)
    assert not store.exists(join_uri(run, "policy_hf/config.json"))  # stopped before the end
    text = finish(submit(grpo, env, tmp_path / "grpo-2.log"), tmp_path / "grpo-2.log")
    assert f"(resumed from {join_uri(run, 'checkpoints', checkpoint_tag(2))})" in text, text[-3000:]
    assert "GRPO finished at step 4" in text
    steps = [row["step"] for row in jsonl(store, join_uri(run, "metrics.jsonl"))]
    assert steps == [1, 2, 3, 4]  # the first job's lines up to its checkpoint, then the resumed job's
    for part in (
        "policy_hf/config.json",
        "curves.png",
        "config.yaml",
        f"checkpoints/{checkpoint_tag(4)}/COMPLETE",
    ):
        assert store.exists(join_uri(run, part)), part
    assert store.list_files(join_uri(run, "samples")), "sample images were not pushed"

    # eval: results pushed as they come (eval.push_every_s=0), stopped after the first, submitted again
    evaluation = join_uri(run, "eval")
    results = join_uri(evaluation, "results.jsonl")
    halfway = commands["eval"] + " eval.push_every_s=0"
    first = submit(halfway, env, tmp_path / "eval-1.log")
    stop_when(lambda: store.exists(results), first, tmp_path / "eval-1.log", ray_head, env)
    before = len(jsonl(store, results))
    text = finish(submit(commands["eval"], env, tmp_path / "eval-2.log"), tmp_path / "eval-2.log")
    keys = {ExpressionResult.from_json(row).key for row in jsonl(store, results)}
    assert 0 < before < expressions and len(keys) == expressions, (before, keys)
    assert f"({before} already in {results})" in text, text[-3000:]
    summary = json.loads(store.read_bytes(join_uri(evaluation, "summary.json")))
    assert summary["expressions"] + summary.get("failed", 0) == expressions, summary
    assert store.list_files(join_uri(evaluation, "masks")), "mask PNGs were not written to the bucket"
    assert store.exists(join_uri(evaluation, "summary.md"))

    # secrets: the S3 credentials appear in no file the jobs wrote (bucket: checkpoints, configs, metrics, logs,
    # wandb, results; here: the jobs' console logs)
    secrets = [s3_server.access_key_id.encode(), s3_server.secret_access_key.encode()]
    written = [(uri, store.read_bytes(uri)) for uri in store.list_files(run)]
    written += [(str(path), path.read_bytes()) for path in tmp_path.glob("*.log")]
    assert len(written) > 20
    leaks = [where for where, data in written if any(secret in data for secret in secrets)]
    assert leaks == [], f"S3 credentials written to {leaks}"
