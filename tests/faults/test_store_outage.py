"""The object store goes away for a while: a run writing everything to s3:// (a moto server behind a TCP proxy
that stops listening and resets its connections, tests/tcp_proxy.py) loses the store for 20 s while it writes a
checkpoint. Every store call retries through the outage (`storage.outage_timeout_s`); the run completes with
the same steps, samples, metrics and weights as an uninterrupted run on local disk."""

from __future__ import annotations

import json
import threading
import time

import pytest
from grpo_runs import STEPS, FaultRun, RunOutcome, assert_same_run, grpo_command, grpo_env
from tcp_proxy import TCPProxy

from veason_ray.object_store import join_uri, store_for

pytestmark = pytest.mark.slow
OUTAGE_S = 20.0


def test_a_store_outage_during_a_checkpoint_is_waited_out_and_the_run_ends_as_if_not(
    tmp_path, s3_server, s3_bucket, synthetic_revos, tiny_models, reference_run
):
    port = int(s3_server.endpoint_url.rsplit(":", 1)[1])
    run_uri = join_uri(s3_bucket, "run")
    store = store_for(run_uri, s3_server)  # the test's own view of the bucket, around the proxy
    with TCPProxy(port) as proxy:
        env = grpo_env(
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}", AWS_REGION=s3_server.region,
            AWS_ACCESS_KEY_ID=s3_server.access_key_id, AWS_SECRET_ACCESS_KEY=s3_server.secret_access_key,
        )  # fmt: skip
        command = grpo_command(run_uri, synthetic_revos, tiny_models, "storage.max_attempts=2")
        run = FaultRun(command, tmp_path / "run.log", env).start()
        # the console's line of step 2 comes just before the driver writes checkpoint 2
        run.wait_for("step 2", lambda: f"step 2/{STEPS}" in run.output)
        proxy.cut()
        cut_at = time.time()
        threading.Timer(OUTAGE_S, proxy.restore).start()
        assert run.finish() == 0, run.output[-3000:]
    marker = json.loads(store.read_bytes(join_uri(run_uri, "checkpoints/step_00000002/COMPLETE")))
    assert marker["time"] > cut_at + OUTAGE_S - 1  # checkpoint 2 was written through the outage
    local = tmp_path / "downloaded"
    local.mkdir()
    (local / "metrics.jsonl").write_bytes(store.read_bytes(join_uri(run_uri, "metrics.jsonl")))
    for part in (f"checkpoints/step_{STEPS:08d}", "policy_hf"):
        store.download_tree(join_uri(run_uri, part), local / part)
    gap = assert_same_run(RunOutcome.read(local), reference_run)
    print(
        f"FAULT object store away {OUTAGE_S:g} s during a checkpoint: run completed; weights within {gap:.2g}"
    )
