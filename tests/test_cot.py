"""CoT data: red boxes and resizing, teacher replies, the record format and its loader, the offline teacher, and
`veason cot` against a real OpenAI-compatible server (vLLM with the tiny model) behind a fault-injecting proxy."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from actors.network import free_port
from pipelines.cli import main as veason
from veason_ray.answer_parsing import ParsedAnswer, parse_answer
from veason_ray.boxes import ground_truth_boxes_560
from veason_ray.cot.client import (
    ChatCompletionsClient,
    ChatReply,
    RetryPolicy,
    TeacherConfigError,
    TeacherEndpoint,
    TeacherRequestError,
    parse_retry_after,
)
from veason_ray.cot.frames import RED, draw_boxes, fit_within, teacher_image
from veason_ray.cot.records import DATASET_INFO, load_sft_example, read_jsonl, user_text, validate_record
from veason_ray.cot.teacher import UnusableReplyError, think_text
from veason_ray.cot.teacher_prompts import EXAMPLE_TEMPLATES, choose_template, teacher_instruction
from veason_ray.datasets import open_dataset
from veason_ray.prompts import build_messages, normalize_expression, render_answer
from veason_ray.rewards import format_reward

# --- frames ---------------------------------------------------------------------------------------------------


def test_fit_within_shrinks_keeping_aspect_and_never_enlarges():
    assert fit_within(1280, 720, 640, 480) == (640, 360)
    assert fit_within(720, 1280, 640, 480) == (270, 480)
    assert fit_within(1920, 1440, 640, 480) == (640, 480)
    assert fit_within(320, 240, 640, 480) == (320, 240)
    with pytest.raises(ValueError):
        fit_within(0, 10, 640, 480)


def test_red_box_is_two_pixels_just_outside_the_box():
    image = np.zeros((20, 30, 3), np.uint8)
    out = draw_boxes(image, [[10, 5, 14, 9]], thickness=2)
    red = np.all(out == RED, axis=-1)
    expected = np.zeros((20, 30), bool)
    expected[3:12, 8:17] = True  # the box grown by 2 on each side ...
    expected[5:10, 10:15] = False  # ... minus the box itself
    assert np.array_equal(red, expected)
    assert not image.any()  # the input is not modified
    clipped = np.all(draw_boxes(image, [[0, 0, 4, 4]]) == RED, axis=-1)  # clipped at the image edge
    assert clipped[5:7, 0:7].all() and clipped[0:5, 5:7].all() and not clipped[0:5, 0:5].any()


def test_teacher_image_fits_640x480_with_one_box_per_present_object():
    frame = np.full((720, 1280, 3), 128, np.uint8)
    boxes = [np.array([100.0, 100.0, 299.0, 199.0]), None, np.array([800.0, 400.0, 999.0, 599.0])]
    image = teacher_image(frame, boxes, (640, 480), thickness=2)
    assert image.shape == (360, 640, 3)
    red = np.all(image == RED, axis=-1)
    # scale 0.5: object 0 covers [50, 149] x [50, 99]; its ring is rows 48-49 / 100-101, cols 48-49 / 150-151
    assert red[48:50, 48:152].all() and red[100:102, 48:152].all() and red[48:102, 48:50].all()
    assert not red[50:100, 50:150].any()
    assert red[198:200, 398:502].all()  # object 2 at [400, 499] x [200, 299]
    ring_pixels = (100 + 4) * (50 + 4) - 100 * 50 + (100 + 4) * (100 + 4) - 100 * 100
    assert int(red.sum()) == ring_pixels  # exactly two rings: nothing drawn for the absent object


# --- teacher prompt and replies ------------------------------------------------------------------------------


def test_teacher_instruction_has_three_steps_keyframe_and_a_seeded_template():
    text = teacher_instruction("The Red Circle.", [0, 3, 6], 3, 2, 1).text
    assert "'the red circle'" in text and "(3s)" in text and "(0s), (3s), (6s)" in text
    assert "1." in text and "2." in text and "3." in text and "never mention red boxes" in text
    assert EXAMPLE_TEMPLATES[1] in text and "are 2 target objects" in text
    picks = [choose_template(0, f"revos/train/v/{i}") for i in range(60)]
    assert set(picks) == {0, 1, 2}
    assert picks == [choose_template(0, f"revos/train/v/{i}") for i in range(60)]
    with pytest.raises(ValueError, match="keyframe"):
        teacher_instruction("x", [0, 3], 5, 1, 0)


def test_think_text_cleans_replies_and_rejects_unusable_ones():
    assert think_text(ChatReply("  The dog runs.  ", "stop", 1)) == "The dog runs."
    reply = '<think>It moves left.</think>\n<answer>{"keyframe_timestamp": 3}</answer>'
    assert think_text(ChatReply(reply, "stop", 1)) == "It moves left."
    assert think_text(ChatReply("a </think> b <answer>x</answer>", "stop", 1)) == "a  b"
    for bad, reason in [
        (ChatReply(None, "stop", 1), "no text"),
        (ChatReply("   <think></think>", "stop", 1), "besides tags"),
        (ChatReply("cut mid-sente", "length", 1), "max_tokens"),
        (ChatReply("The target inside the red box is a cat.", "stop", 1), "red boxes"),
    ]:
        with pytest.raises(UnusableReplyError, match=reason):
            think_text(bad)


def test_retry_policy_and_retry_after():
    policy = RetryPolicy(max_retries=5, backoff_base_s=1.0, backoff_max_s=10.0)
    rng = random.Random(0)
    for retry in range(6):
        delays = [policy.delay(retry, None, rng) for _ in range(200)]
        assert 0 <= min(delays) and max(delays) <= min(10.0, 2**retry)
        assert max(delays) > 0.5 * min(10.0, 2**retry)  # full jitter spans the range
    assert policy.delay(0, 3.0, rng) == 3.0  # Retry-After longer than the backoff wins
    assert policy.delay(0, 99.0, rng) == 10.0  # ... up to the cap
    assert (
        parse_retry_after("2") == 2.0
        and parse_retry_after(None) is None
        and parse_retry_after("soon") is None
    )
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0


def test_endpoint_from_config_or_environment(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_MODEL", raising=False)
    with pytest.raises(TeacherConfigError, match="cot.base_url"):
        TeacherEndpoint.resolve("", "m", "")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://h:1/v1/")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")
    endpoint = TeacherEndpoint.resolve("", "m", "")
    assert endpoint.chat_url == "http://h:1/v1/chat/completions" and endpoint.api_key == "sk-secret-123"
    assert "sk-secret" not in repr(endpoint)
    with pytest.raises(TeacherConfigError, match="cot.model"):
        TeacherEndpoint.resolve("http://h:1/v1", "", "")


# --- the offline path: records, loader, resume ------------------------------------------------------------------


def _records(out: Path) -> list[dict]:
    return list(read_jsonl(out / "cot.jsonl"))


def test_offline_records_follow_the_contract_and_score_full_format(synthetic_revos: Path, tmp_path: Path):
    out = tmp_path / "cot"
    assert (
        veason(["cot", f"data.root={synthetic_revos}", "cot.teacher=offline", f"cot.output_dir={out}"]) == 0
    )
    records = _records(out)
    dataset = open_dataset("revos", str(synthetic_revos), "train")
    all_records = list(dataset.expressions())
    assert len(records) == sum(r.type_id != 2 for r in all_records) > 0  # no-target expressions left out
    assert list(read_jsonl(out / "failures.jsonl")) == []
    assert json.loads((out / "dataset_info.json").read_text()) == DATASET_INFO
    by_key = {f"revos/train/{r.video}/{r.exp_id}": r for r in all_records}
    for record in records:
        validate_record(record)
        meta = record["veason"]
        assert meta["teacher"] == "offline" and meta["keyframe"] in meta["frame_indices"]
        assert len(meta["frame_indices"]) == 7
        assert record["messages"][1]["content"] == user_text(meta["frame_indices"], meta["expression"])
        answer = record["messages"][2]["content"]
        parsed = parse_answer(answer)
        assert isinstance(parsed, ParsedAnswer) and format_reward(answer) == 2.0
        assert parsed.keyframe == meta["keyframe"]
        source = by_key[meta["key"]]
        masks = dataset.object_masks(source, [meta["keyframe"]])[:, 0]
        present = masks[[m.any() for m in masks]]
        assert np.allclose(parsed.boxes, np.round(ground_truth_boxes_560(present)))
        think = parsed.think
        assert answer == render_answer(think, meta["keyframe"], meta["boxes_560"])
    messages, answer = load_sft_example(records[0], str(out))
    meta = records[0]["veason"]
    frames = [item["image"] for item in messages[1]["content"] if item["type"] == "image"]
    assert all(f.shape == (560, 560, 3) and f.dtype == np.uint8 for f in frames)
    expected = build_messages(meta["frame_indices"], meta["expression"], frames)
    assert messages[0] == expected[0] and len(messages[1]["content"]) == len(expected[1]["content"])
    for got, want in zip(messages[1]["content"], expected[1]["content"], strict=True):
        assert got.keys() == want.keys() and got.get("text") == want.get("text")
    assert answer == records[0]["messages"][2]["content"]
    # the same run again does nothing: everything is done
    assert (
        veason(["cot", f"data.root={synthetic_revos}", "cot.teacher=offline", f"cot.output_dir={out}"]) == 0
    )
    assert _records(out) == records


def test_a_rerun_with_other_frame_settings_is_refused_not_mixed_in(synthetic_revos: Path, tmp_path: Path):
    # What happened on a GPU: a folder of 7-frame records silently "resumed" by a 4-frame run.
    out = tmp_path / "cot"
    args = ["cot", f"data.root={synthetic_revos}", "cot.teacher=offline", f"cot.output_dir={out}"]
    assert veason([*args, "cot.num_frames=3", "cot.max_samples=4"]) == 0
    records = _records(out)
    with pytest.raises(SystemExit, match=r"num_frames: 3 there, 4 now"):
        veason([*args, "cot.num_frames=4"])
    assert _records(out) == records
    assert veason([*args, "cot.num_frames=3"]) == 0  # the same settings resume
    assert all(len(r["veason"]["frame_indices"]) == 3 for r in _records(out))


def test_bad_samples_are_recorded_and_a_rerun_completes_only_them(
    synthetic_revos: Path, tmp_path: Path, capsys
):
    root = tmp_path / "data"
    shutil.copytree(synthetic_revos, root)
    dataset = open_dataset("revos", str(root), "train")
    video = dataset.video_names[0]
    broken = [f for f in sorted((root / "JPEGImages" / video).glob("*.jpg"))]
    saved = {f: f.read_bytes() for f in broken}
    for f in broken:
        f.write_bytes(b"not a jpeg")
    out = tmp_path / "cot"
    args = ["cot", f"data.root={root}", "cot.teacher=offline", f"cot.output_dir={out}", "cot.concurrency=3"]
    assert veason(args) == 0
    failures = list(read_jsonl(out / "failures.jsonl"))
    bad_keys = {f"revos/train/{r.video}/{r.exp_id}" for r in dataset.expressions_of(video) if r.type_id != 2}
    assert {f["key"] for f in failures} == bad_keys and all(
        f["error_type"] == "CorruptFrameError" for f in failures
    )
    good = _records(out)
    assert not {r["veason"]["key"] for r in good} & bad_keys
    with open(out / "cot.jsonl", "a") as f:  # a crash in the middle of an append
        f.write('{"messages": [{"role": "sys')
    assert veason([*args, "cot.retry_failed=false"]) == 0  # failed samples are held back when asked
    assert f"held back {len(bad_keys)}" in capsys.readouterr().out
    for f, data in saved.items():
        f.write_bytes(data)
    assert veason(args) == 0
    printed = capsys.readouterr().out
    assert f"done {len(bad_keys)}, failed 0, skipped {len(good)}" in printed
    final = _records(out)
    assert final[: len(good)] == good  # earlier records untouched, the partial line gone
    assert {r["veason"]["key"] for r in final[len(good) :]} == bad_keys


# --- a real OpenAI-compatible server (vLLM + the tiny model) behind a fault-injecting proxy ----------------------

SERVER_ENV = {
    "OMP_NUM_THREADS": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
    "RAY_AUTH_MODE": "disabled",
}
SERVED_MODEL = "tiny-teacher"


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """vLLM's own OpenAI server with the tiny random Qwen2.5-VL on 127.0.0.1; yields its /v1 base URL."""
    from veason_ray.models.tiny_qwen import write_tiny_qwen

    model = write_tiny_qwen(tmp_path_factory.mktemp("teacher") / "qwen2_5_vl_tiny", seed=0)
    port = free_port("127.0.0.1")
    log = tmp_path_factory.mktemp("teacher_log") / "server.log"
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--served-model-name", SERVED_MODEL, "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
        "--max-model-len", "4096", "--dtype", "bfloat16", "--limit-mm-per-prompt", '{"image": 8}',
        "--max-num-seqs", "8", "--seed", "0",
    ]  # fmt: skip
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, **SERVER_ENV}
        )
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                pytest.fail(f"vLLM server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base_url}/models", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM server not up after 300 s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class FaultProxy:
    """An aiohttp server in its own thread that forwards chat completions to ``upstream``, except: requests
    whose body contains ``fail_marker`` always get 503; the n-th other request (1-based) gets ``faults[n]`` ("429" with Retry-After: 1, "500", "502", "hang": no answer until the test ends, or
    "echo401": 401 with the Authorization header in the body).
    ``log`` holds (time, status, instruction text) per request."""

    def __init__(self, upstream: str, faults: dict[int, str]):
        self.upstream, self.faults, self.fail_marker = upstream, dict(faults), ""
        self.served = 0  # requests without the marker so far
        self.log: list[tuple[float, int, str]] = []
        self.loop = asyncio.new_event_loop()
        self.release = asyncio.Event()
        self.port = free_port("127.0.0.1")
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/chat/completions", self._handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        self.session = aiohttp.ClientSession()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        doc = json.loads(body)
        instruction = doc["messages"][-1]["content"][-1]["text"]
        if self.fail_marker and self.fail_marker in instruction:
            fault, status = "", 503
        else:
            self.served += 1
            fault = self.faults.get(self.served, "")
            status = {"429": 429, "500": 500, "502": 502}.get(fault, 200)
        self.log.append((time.monotonic(), 0 if fault == "hang" else status, instruction))
        if fault == "echo401":  # a server that echoes the credentials it got
            return web.Response(status=401, text=f"bad key: {request.headers.get('Authorization')}")
        if fault == "hang":
            await self.release.wait()
            return web.Response(status=504)
        if status != 200:
            headers = {"Retry-After": "1"} if status == 429 else {}
            return web.Response(status=status, text=f"injected {status}", headers=headers)
        async with self.session.post(
            f"{self.upstream}/chat/completions", data=body, headers={"Content-Type": "application/json"}
        ) as upstream:
            return web.Response(
                status=upstream.status, body=await upstream.read(), content_type="application/json"
            )

    def close(self) -> None:
        async def stop() -> None:
            self.release.set()
            await self.session.close()
            await self.runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _expression_of(instruction: str) -> str:
    return instruction.split("the expression '", 1)[1].split("' ", 1)[0]


def test_cot_against_a_real_server_with_failures_and_resume(
    vllm_server: str, synthetic_revos: Path, tmp_path: Path
):
    dataset = open_dataset("revos", str(synthetic_revos), "train")
    all_records = list(dataset.expressions())
    usable = [r for r in all_records if r.type_id != 2]
    limit = all_records.index(usable[7]) + 1
    first, marker = usable[:8], normalize_expression(usable[2].expression)
    out = tmp_path / "cot"
    proxy = FaultProxy(vllm_server, {1: "429", 2: "500", 3: "hang", 5: "502", 7: "429", 9: "500"})
    proxy.fail_marker = marker
    base = [
        "cot", f"data.root={synthetic_revos}", "cot.teacher=openai", f"cot.base_url={proxy.base_url}",
        f"cot.model={SERVED_MODEL}", "cot.api_key=sk-test-secret-key", f"cot.output_dir={out}",
        "cot.concurrency=4", "cot.timeout_s=3", "cot.max_retries=3", "cot.backoff_base_s=0.05",
        "cot.backoff_max_s=2", "cot.max_tokens=256", "cot.temperature=1.0", "cot.progress_every_s=0",
    ]  # fmt: skip
    try:
        # run 1: the expressions up to the 8th usable one (file order), some requests failing on the way
        assert veason([*base, f"cot.max_samples={limit}"]) == 0
        keys = {f"revos/train/{r.video}/{r.exp_id}" for r in first}
        done = {r["veason"]["key"] for r in _records(out)}
        failed = {f["key"]: f for f in read_jsonl(out / "failures.jsonl")}
        assert done | set(failed) == keys and not done & set(failed)  # every sample: a record or a failure
        marked = {
            f"revos/train/{r.video}/{r.exp_id}" for r in first if normalize_expression(r.expression) == marker
        }
        assert marked <= set(failed)
        assert all(
            failed[k]["error_type"] == "TeacherRequestError" and "503" in failed[k]["error"] for k in marked
        )
        statuses = [s for _, s, _ in proxy.log]
        assert statuses.count(429) >= 2 and statuses.count(500) >= 2 and 0 in statuses  # faults were served
        retried = [i for i, (_, s, _) in enumerate(proxy.log) if s == 429 and marker not in proxy.log[i][2]]
        for i in retried:  # Retry-After: 1 honoured before the same request came again
            t, _, text = proxy.log[i]
            again = next(t2 for t2, _, text2 in proxy.log[i + 1 :] if text2 == text)
            assert again - t >= 0.95
        assert all(r["veason"]["teacher"] == f"openai:{SERVED_MODEL}" for r in _records(out))
        for record in _records(out):
            validate_record(record)
            assert format_reward(record["messages"][2]["content"]) == 2.0
        texts = (out / "failures.jsonl").read_text() + (out / "config.yaml").read_text()
        assert "sk-test-secret-key" not in texts

        # run 2: every usable expression, a healthy proxy; only what is not done yet is requested
        proxy.fail_marker, proxy.faults = "", {}
        seen = len(proxy.log)
        assert veason(base) == 0
        requested = [_expression_of(text) for _, _, text in proxy.log[seen:]]
        rest = [r for r in usable if f"revos/train/{r.video}/{r.exp_id}" not in done]
        assert sorted(requested) == sorted(normalize_expression(r.expression) for r in rest)
        final_done = {r["veason"]["key"] for r in _records(out)}
        assert len(final_done) == len(_records(out))  # no key written twice
        last_failed = {f["key"] for f in read_jsonl(out / "failures.jsonl")} - final_done
        assert final_done | last_failed == {f"revos/train/{r.video}/{r.exp_id}" for r in usable}
        assert final_done >= done and len(final_done) > len(done)
    finally:
        proxy.close()


def test_final_errors_are_not_retried_and_never_show_the_key(monkeypatch):
    proxy = FaultProxy("http://127.0.0.1:9", {1: "echo401"})
    endpoint = TeacherEndpoint.resolve(proxy.base_url, "m", "sk-do-not-log-me")

    async def ask() -> None:
        async with ChatCompletionsClient(endpoint, RetryPolicy(max_retries=3, backoff_base_s=0.01)) as client:
            await client.complete([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])

    try:
        with pytest.raises(TeacherRequestError) as caught:
            asyncio.run(ask())
    finally:
        proxy.close()
    assert caught.value.status == 401 and caught.value.attempts == 1 and len(proxy.log) == 1
    assert "sk-do-not-log-me" not in str(caught.value) and "Bearer ***" in str(caught.value)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(SystemExit, match="cot.base_url"):
        veason(["cot", "cot.teacher=openai", "cot.model=m", "data.root=/nonexistent"])
