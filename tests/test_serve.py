"""The Serve app over real HTTP: `veason serve` on 127.0.0.1 (tests/serve_server.py: the tiny policy on a vLLM
engine with constrained answers, the tiny SAM2, an API key, video URLs on the test S3 server). A valid request
gets a mask for every frame; streaming gives every frame once and the same masks; bad requests get a 4xx that
names the field and the server stays healthy; the key is required; URLs to private addresses are refused."""

from __future__ import annotations

import base64
import json
import tempfile
import time
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import requests
from test_video_decoding import write_mp4

from veason_ray.config import StorageConfig
from veason_ray.datasets import decode_rle
from veason_ray.object_store import store_for

QUERY = "the large purple shape"
NUM_FRAMES = 12


def _frames(count: int = NUM_FRAMES, height: int = 120, width: int = 160) -> np.ndarray:
    """A purple square moving right on a grey background."""
    frames = np.full((count, height, width, 3), 90, dtype=np.uint8)
    for t in range(count):
        frames[t, 30:80, 10 + 5 * t : 60 + 5 * t] = (150, 40, 200)
    return frames


def _mp4(frames: np.ndarray, fps: int = 6) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "clip.mp4"
        write_mp4(path, frames, fps=fps)
        return path.read_bytes()


def _jpegs(frames: np.ndarray) -> list[str]:
    return [
        base64.b64encode(cv2.imencode(".jpg", f[:, :, ::-1])[1].tobytes()).decode("ascii") for f in frames
    ]


@pytest.fixture(scope="module")
def clip() -> bytes:
    return _mp4(_frames())


def _upload(server, clip: bytes, route: str = "/v1/segment/upload", **form) -> requests.Response:
    data = {"query": QUERY, **{k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in form.items()}}
    files = {"file": ("clip.mp4", clip, "video/mp4")}
    return requests.post(server.url + route, data=data, files=files, headers=server.headers, timeout=300)


def _decoded(masks: list[dict]) -> np.ndarray:
    return np.stack([decode_rle({"size": m["size"], "counts": m["counts"]}) for m in masks]).astype(bool)


def test_upload_gets_the_answer_and_a_mask_for_every_frame(serve_server, clip):
    response = _upload(serve_server, clip, overlay=True)
    assert response.status_code == 200, response.text
    body = response.json()
    assert response.headers["X-Request-ID"] == body["request_id"]
    assert body["model"]["name"] == "qwen2_5_vl_tiny" and len(body["model"]["version"]) == 12
    assert (response.headers["X-Model-Name"], response.headers["X-Model-Version"]) == (
        body["model"]["name"], body["model"]["version"],
    )  # fmt: skip
    assert body["video"] == {"frames": NUM_FRAMES, "height": 120, "width": 160, "fps": 6.0}
    assert body["frame_indices"] == [0, 3, 7, 11]  # 4 evenly spaced frames, first and last
    # constrained decoding: the random policy names one of the prompt's frames and boxes the target
    assert body["keyframe"] in body["frame_indices"] and body["empty_reason"] is None
    assert body["boxes"] and all(len(box) == 4 for box in body["boxes"])
    assert body["answer"].count("<answer>") == 1 and isinstance(body["reasoning"], str)
    assert [m["frame"] for m in body["masks"]] == list(range(NUM_FRAMES))
    masks = _decoded(body["masks"])
    assert masks.shape == (NUM_FRAMES, 120, 160)
    assert body["mask_frames_nonempty"] == int(masks.reshape(NUM_FRAMES, -1).any(axis=1).sum())
    assert set(body["seconds"]) == {"read", "policy", "propagate", "encode", "total"}
    with av.open(_as_file(base64.b64decode(body["overlay_mp4"]))) as container:  # a playable video
        played = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(played) == NUM_FRAMES and played[0].shape[:2] == (120, 160)


def _as_file(data: bytes):
    import io

    return io.BytesIO(data)


def test_frames_and_s3_urls_give_the_same_answer_as_an_upload(serve_server, s3_bucket, s3_server):
    frames = _frames()
    as_frames = requests.post(
        serve_server.url + "/v1/segment",
        json={"query": QUERY, "frames": _jpegs(frames), "reasoning": False},
        headers=serve_server.headers,
        timeout=300,
    )
    assert as_frames.status_code == 200, as_frames.text
    body = as_frames.json()
    assert body["video"]["frames"] == NUM_FRAMES and len(body["masks"]) == NUM_FRAMES
    assert body["reasoning"] is None and body["answer"] is None
    uri = f"{s3_bucket}/videos/clip.mp4"
    store_for(uri, s3_server).write_bytes(uri, _mp4(frames))
    as_url = requests.post(
        serve_server.url + "/v1/segment",
        json={"query": QUERY, "video_url": uri, "masks": "none"},
        headers=serve_server.headers,
        timeout=300,
    )
    assert as_url.status_code == 200, as_url.text
    assert as_url.json()["masks"] is None and as_url.json()["video"]["frames"] == NUM_FRAMES


def test_streaming_returns_every_frame_once_with_the_same_masks(serve_server, clip):
    whole = _upload(serve_server, clip).json()
    streamed = _upload(serve_server, clip, route="/v1/segment/upload/stream")
    assert streamed.status_code == 200 and streamed.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in streamed.text.splitlines() if line]
    head, masks, done = lines[0], lines[1:-1], lines[-1]
    assert head["event"] == "answer" and done["event"] == "done", lines[-1]
    assert (head["keyframe"], head["boxes"]) == (whole["keyframe"], whole["boxes"])
    # propagation order: the keyframe, forward to the end, then backward to the first frame
    keyframe = head["keyframe"]
    order = [*range(keyframe, NUM_FRAMES), *range(keyframe - 1, -1, -1)]
    assert [m["frame"] for m in masks] == order and done["mask_frames"] == NUM_FRAMES
    by_frame = sorted(masks, key=lambda m: m["frame"])
    assert np.array_equal(_decoded(by_frame), _decoded(whole["masks"]))

    json_stream = requests.post(
        serve_server.url + "/v1/segment/stream",
        json={"query": QUERY, "frames": _jpegs(_frames(5))},
        headers=serve_server.headers,
        timeout=300,
        stream=True,
    )
    events = [json.loads(line)["event"] for line in json_stream.iter_lines() if line]
    assert events == ["answer"] + ["mask"] * 5 + ["done"]


def _bad_requests(server, tmp_path: Path) -> list[tuple[str, requests.Response, int, str | None]]:
    """(what, response, expected status, expected field) for every kind of bad request."""
    url, headers = server.url, server.headers
    good = _jpegs(_frames(4))
    segment = url + "/v1/segment"

    def post(body, **kw):
        return requests.post(segment, json=body, headers=headers, timeout=60, **kw)

    big_png = base64.b64encode(cv2.imencode(".png", np.zeros((700, 700, 3), np.uint8))[1].tobytes()).decode()
    other_size = base64.b64encode(cv2.imencode(".png", np.zeros((60, 80, 3), np.uint8))[1].tobytes()).decode()
    long_clip = _mp4(_frames(41, 48, 64))  # more than serve.max_frames=40
    slow_clip = _mp4(_frames(25, 48, 64), fps=1)  # 25 s, longer than serve.max_duration_s=20
    files = lambda data: {"file": ("v.mp4", data, "video/mp4")}  # noqa: E731
    upload = url + "/v1/segment/upload"
    return [
        ("not JSON", requests.post(segment, data=b"{not json", headers={**headers, "Content-Type": "application/json"}, timeout=60), 422, None),
        ("no query", post({"frames": good}), 422, "query"),
        ("empty query", post({"query": "", "frames": good}), 422, "query"),
        ("blank query", post({"query": "   ", "frames": good}), 422, "query"),
        ("query too long", post({"query": "x" * 1001, "frames": good}), 422, "query"),
        ("query not a string", post({"query": 5, "frames": good}), 422, "query"),
        ("no video", post({"query": QUERY}), 422, "video_url"),
        ("both url and frames", post({"query": QUERY, "frames": good, "video_url": "s3://b/v.mp4"}), 422, "video_url"),
        ("frames empty", post({"query": QUERY, "frames": []}), 422, "frames"),
        ("frame not base64", post({"query": QUERY, "frames": ["%%%"]}), 400, "frames.0"),
        ("frame not an image", post({"query": QUERY, "frames": [base64.b64encode(b"hello").decode()]}), 400, "frames.0"),
        ("frame too large", post({"query": QUERY, "frames": [big_png]}), 422, "frames.0"),
        ("frames of two sizes", post({"query": QUERY, "frames": good + [other_size]}), 422, "frames"),
        ("too many frames", post({"query": QUERY, "frames": good * 11}), 422, "frames"),
        ("num_frames zero", post({"query": QUERY, "frames": good, "num_frames": 0}), 422, "num_frames"),
        ("num_frames too many", post({"query": QUERY, "frames": good, "num_frames": 17}), 422, "num_frames"),
        ("masks unknown", post({"query": QUERY, "frames": good, "masks": "png"}), 422, "masks"),
        ("unknown field", post({"query": QUERY, "frames": good, "colour": "red"}), 422, "colour"),
        ("fps negative", post({"query": QUERY, "frames": good, "fps": -1}), 422, "fps"),
        ("url scheme", post({"query": QUERY, "video_url": "file:///etc/passwd"}), 422, "video_url"),
        ("s3 object missing", post({"query": QUERY, "video_url": "s3://no-such-bucket-veason/v.mp4"}), 422, "video_url"),
        ("upload without file", requests.post(upload, data={"query": QUERY}, files={"x": ("a", b"b")}, headers=headers, timeout=60), 422, "file"),
        ("upload without query", requests.post(upload, files=files(_mp4(_frames(3))), headers=headers, timeout=60), 422, "query"),
        ("upload not a video", requests.post(upload, data={"query": QUERY}, files=files(b"\x00" * 2048), headers=headers, timeout=60), 400, "file"),
        ("upload too many frames", requests.post(upload, data={"query": QUERY}, files=files(long_clip), headers=headers, timeout=60), 422, "file"),
        ("upload too long", requests.post(upload, data={"query": QUERY}, files=files(slow_clip), headers=headers, timeout=60), 422, "file"),
        ("body too large", requests.post(upload, data={"query": QUERY}, files=files(b"\x00" * (8 << 20)), headers=headers, timeout=60), 413, "body"),
        ("unknown route", requests.get(url + "/v1/nothing", headers=headers, timeout=60), 404, None),
        ("wrong method", requests.get(segment, headers=headers, timeout=60), 405, None),
    ]  # fmt: skip


def test_bad_requests_get_a_4xx_naming_the_field_and_the_server_keeps_serving(serve_server, tmp_path):
    cases = _bad_requests(serve_server, tmp_path)
    assert len(cases) >= 20
    for what, response, status, field in cases:
        assert response.status_code == status, f"{what}: {response.status_code} {response.text[:300]}"
        error = response.json()["error"]
        assert error["message"] and error["request_id"], what
        assert response.headers["X-Model-Version"], what  # the model's version in every response
        if field is not None:
            assert error["field"] == field or error["field"].startswith(field), f"{what}: {error}"
    ready = requests.get(serve_server.url + "/v1/health/ready", headers=serve_server.headers, timeout=30)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    ok = requests.post(
        serve_server.url + "/v1/segment",
        json={"query": QUERY, "frames": _jpegs(_frames(4))},
        headers=serve_server.headers,
        timeout=300,
    )
    assert ok.status_code == 200 and len(ok.json()["masks"]) == 4


def test_a_model_error_is_a_5xx_with_the_request_id_and_the_replica_keeps_serving(serve_server):
    # 16 frames of 560x560 make a prompt longer than the demo engine's max_model_len (4096): vLLM refuses it
    too_long = requests.post(
        serve_server.url + "/v1/segment",
        json={"query": QUERY, "frames": _jpegs(_frames(16)), "num_frames": 16},
        headers={**serve_server.headers, "X-Request-ID": "model-error-1"},
        timeout=300,
    )
    assert too_long.status_code == 500, too_long.text
    error = too_long.json()["error"]
    assert error["request_id"] == "model-error-1" and "model-error-1" in error["message"]
    ok = requests.post(
        serve_server.url + "/v1/segment",
        json={"query": QUERY, "frames": _jpegs(_frames(4))},
        headers=serve_server.headers,
        timeout=300,
    )
    assert ok.status_code == 200, ok.text


def test_the_api_key_is_required_everywhere_but_liveness(serve_server):
    url = serve_server.url
    assert requests.get(url + "/v1/health/live", timeout=30).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": serve_server.api_key}):
        for method, route in (("get", "/v1/info"), ("get", "/v1/health/ready"), ("post", "/v1/segment")):
            response = getattr(requests, method)(url + route, headers=headers, timeout=30, json={})
            assert response.status_code == 401, (route, headers, response.text)
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert response.json()["error"]["field"] == "Authorization"
    assert requests.get(url + "/v1/info", headers=serve_server.headers, timeout=30).status_code == 200


@pytest.mark.parametrize(
    "address",
    [
        "http://127.0.0.1:9/video.mp4",
        "http://localhost/video.mp4",
        "http://10.0.0.1/video.mp4",
        "http://169.254.169.254/latest/meta-data?token=secret-in-query",
        "http://[::1]/video.mp4",
    ],
)
def test_urls_to_private_addresses_are_refused(serve_server, address):
    error = serve_server.refused_video_url(QUERY, address)
    assert "secret-in-query" not in error["message"], error


def test_the_openapi_schema_documents_the_api(serve_server):
    schema = requests.get(serve_server.url + "/openapi.json", headers=serve_server.headers, timeout=30).json()
    paths = schema["paths"]
    for route in ("/v1/segment", "/v1/segment/upload", "/v1/segment/stream", "/v1/segment/upload/stream"):
        assert "post" in paths[route], route
    for route in ("/v1/health/live", "/v1/health/ready", "/v1/info"):
        assert "get" in paths[route], route
    models = schema["components"]["schemas"]
    assert {"SegmentRequest", "SegmentResponse", "FrameMask", "ErrorResponse"} <= set(models)
    assert "query" in models["SegmentRequest"]["required"]


def test_logs_carry_request_ids_but_never_the_key_or_a_urls_query(serve_server):
    requests.post(
        serve_server.url + "/v1/segment",
        json={"query": QUERY, "video_url": "http://10.1.2.3/v.mp4?sig=hidden-signature"},
        headers={**serve_server.headers, "X-Request-ID": "log-check-1"},
        timeout=60,
    )
    deadline = time.monotonic() + 30  # replica logs reach the files and the driver's output with a delay
    while "request log-check-1 POST /v1/segment -> 422" not in (logs := _serve_logs(serve_server)):
        assert time.monotonic() < deadline, "the request's log line never came"
        time.sleep(0.5)
    assert "hidden-signature" not in logs and serve_server.api_key not in logs


def _serve_logs(server) -> str:
    """The driver's output and the replicas' log files of the test server's Ray session."""
    texts = [server.log.read_text(errors="replace")]
    texts += [p.read_text(errors="replace") for p in server.ray_dir.glob("session_*/logs/serve/*.log")]
    texts += [
        p.read_text(errors="replace") for p in server.log.parent.glob("logs/*.log")
    ]  # the console's log
    return "\n".join(texts)


def test_storage_config_is_not_leaked_in_errors(serve_server, s3_server: StorageConfig):
    response = requests.post(
        serve_server.url + "/v1/segment",
        json={"query": QUERY, "video_url": "s3://no-such-bucket-veason/v.mp4"},
        headers=serve_server.headers,
        timeout=60,
    )
    assert response.status_code == 422
    assert s3_server.secret_access_key not in response.text
