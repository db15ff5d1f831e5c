"""The Serve app fuzzed from its own OpenAPI schema: schemathesis reads the live /openapi.json of `veason serve`
(tests/serve_server.py, the server test_serve.py shares) and generates requests for every operation, sent over
real HTTP. No response may be a 5xx; each must have a status code, content type and body the schema declares;
the server must still serve afterwards (liveness, then one real segmentation).

Four runs: schema-valid and schema-breaking requests with the key (JSON bodies, multipart uploads, and path
and query parameters if the schema ever has them); the same without a key and with a wrong one (a 401
everywhere but liveness); schema-valid requests whose video_url is URL-shaped (a scheme, then delimiters,
addresses and text), which random strings never are; and schema-valid options and queries on a real video,
the only requests that reach the models (about 1.5 s each on CPU, so few). Hypothesis draws a fixed number of
examples per operation from a fixed seed and keeps no example database, so CI sends the same requests on
every run. DEFAULT sizes the default suite's runs, LARGE the slow test's.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from test_serve import QUERY, _frames, _jpegs, _mp4

from serve import url_fetch
from serve.url_fetch import URLRefusedError, fetch_url, redact_url

SEED = 26  # the issue that asked for this fuzz
REQUEST_TIMEOUT_S = 120.0
LIVENESS = "GET /v1/health/live"
JSON_SEGMENT_OPERATIONS = {"POST /v1/segment", "POST /v1/segment/stream"}
SEGMENT_OPERATIONS = JSON_SEGMENT_OPERATIONS | {"POST /v1/segment/upload", "POST /v1/segment/upload/stream"}
# Every response is checked by all of these. Of schemathesis's other built-in checks:
# - positive_data_acceptance is left out on purpose: a schema-valid request is still refused, with a 4xx that
#   names the field, by rules the schema cannot state (exactly one of video_url or frames; frames are base64
#   images of one size; an upload or URL is a video within the server's limits; a query is not blank;
#   num_frames <= serve.max_policy_frames), and a multipart form cannot carry the null the schema allows for
#   num_frames (schemathesis sends the text "null").
# - ignored_auth, missing_required_header, use_after_free, ensure_resource_availability and unsupported_method
#   check what this schema does not declare (security schemes, required headers, resources) or what only the
#   CLI's coverage phase sends; the key is tested here by the requests without it.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
# A real video swapped into a schema-valid case makes schemathesis validate the body again, and an upload's
# bytes read to it as not the string the schema declares: those cases are schema-valid, so
# negative_data_rejection (schema-breaking requests are refused) does not apply to them.
ON_VIDEO_CHECKS = [check for check in CHECKS if check is not negative_data_rejection]
# A video_url made of pieces: a scheme, then URL delimiters, addresses and a little random text (random text
# alone almost never puts a '[' or an '@' where a URL parser looks for them).
URL_PIECES = ["[", "]", ":", "@", "/", "?", "#", "%", ".", " ", "::1", "127.0.0.1", "example.com", "99999"]
URL_SHAPED = st.builds(
    lambda scheme, pieces: scheme + "".join(pieces),
    st.sampled_from(["http://", "https://", "s3://", "ftp://", "HTTP://", "//"]),
    st.lists(st.one_of(st.sampled_from(URL_PIECES), st.text(max_size=3)), max_size=8),
)


@dataclass(frozen=True)
class FuzzSize:
    """Examples per operation: `with_key` in each of positive and negative mode; `without_key` in each mode for
    no key and again for a wrong key; `url_shaped` per JSON segmentation operation; `on_video` per segmentation
    operation, on a real video."""

    with_key: int
    without_key: int
    url_shaped: int
    on_video: int


DEFAULT = FuzzSize(with_key=25, without_key=3, url_shaped=25, on_video=2)
LARGE = FuzzSize(with_key=300, without_key=25, url_shaped=300, on_video=12)


@pytest.fixture(scope="module")
def api_schema(serve_server) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(
        serve_server.url + "/openapi.json", headers=serve_server.headers, timeout=30
    )


def operations(schema) -> list:
    found = [result.ok() for result in schema.get_all_operations()]
    assert {LIVENESS, "GET /v1/info"} | SEGMENT_OPERATIONS <= {op.label for op in found}
    return found


def modes(operation) -> list[GenerationMode]:
    """Negative mode needs something to break: an operation without inputs gets positive requests only."""
    inputs = ("body", "path_parameters", "query", "headers", "cookies")
    if any(len(getattr(operation, where)) for where in inputs):
        return [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
    return [GenerationMode.POSITIVE]


Adapt = Callable[[st.SearchStrategy[Case]], st.SearchStrategy[Case]]


def fuzz(
    operation,
    mode: GenerationMode,
    examples: int,
    headers: dict[str, str] | None,
    statuses: Counter,
    adapt: Adapt | None = None,
    checks: list = CHECKS,
) -> None:
    """Send up to `examples` requests that schemathesis generates for `operation` (`adapt`ed first, if given),
    each answer put through `checks`; `statuses` counts (operation, status) of every request sent (shrinking a
    failure sends more)."""
    cases = operation.as_strategy(generation_mode=mode)

    @seed(SEED)
    @settings(
        max_examples=examples,
        database=None,
        deadline=None,
        phases=(Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
    )
    @given(case=adapt(cases) if adapt else cases)
    def send(case: Case) -> None:
        response = case.call(headers=headers, timeout=REQUEST_TIMEOUT_S)
        statuses[operation.label, response.status_code] += 1
        case.validate_response(response, checks=checks, headers=headers)

    send()


def with_url_shaped_video_url(cases: st.SearchStrategy[Case]) -> st.SearchStrategy[Case]:
    def put(case: Case, url: str) -> Case:
        case.body = {key: value for key, value in case.body.items() if key != "frames"} | {"video_url": url}
        return case

    return st.builds(put, cases, URL_SHAPED)


def on_a_video(frames: list[str], clip: bytes) -> Adapt:
    """Cases given a real video: `frames` in a JSON body (instead of any video_url), `clip` as an upload."""

    def put(case: Case) -> Case:
        if "file" in case.body:
            case.body = {**case.body, "file": clip}
        else:
            case.body = {key: value for key, value in case.body.items() if key != "video_url"} | {
                "frames": frames
            }
        return case

    return lambda cases: cases.map(put)


def fuzz_with_key(server, schema, examples: int) -> Counter:
    statuses: Counter = Counter()
    for operation in operations(schema):
        for mode in modes(operation):
            fuzz(operation, mode, examples, server.headers, statuses)
    return statuses


def fuzz_without_key(server, schema, examples: int) -> Counter:
    statuses: Counter = Counter()
    for headers in (None, {"Authorization": "Bearer not-the-key"}):
        for operation in operations(schema):
            for mode in modes(operation):
                fuzz(operation, mode, examples, headers, statuses)
    assert {status for (label, status) in statuses if label != LIVENESS} == {401}, statuses
    return statuses


def fuzz_url_shaped(server, schema, examples: int) -> Counter:
    statuses: Counter = Counter()
    for operation in operations(schema):
        if operation.label in JSON_SEGMENT_OPERATIONS:
            adapt = with_url_shaped_video_url
            fuzz(operation, GenerationMode.POSITIVE, examples, server.headers, statuses, adapt)
    return statuses


def fuzz_on_video(server, schema, examples: int) -> Counter:
    adapt, checks = on_a_video(_jpegs(_frames(4)), _mp4(_frames(4))), ON_VIDEO_CHECKS
    statuses: Counter = Counter()
    for operation in operations(schema):
        if operation.label in SEGMENT_OPERATIONS:
            fuzz(operation, GenerationMode.POSITIVE, examples, server.headers, statuses, adapt, checks)
    assert any(status == 200 for (_, status) in statuses), statuses  # the models were reached
    return statuses


def report(what: str, statuses: Counter, started: float) -> None:
    by_status = Counter()
    for (_, status), count in statuses.items():
        by_status[status] += count
    seconds, total = time.monotonic() - started, sum(statuses.values())
    print(f"fuzz {what}: {total} requests {dict(sorted(by_status.items()))} in {seconds:.1f} s")


def assert_still_serving(server) -> None:
    assert requests.get(server.url + "/v1/health/live", timeout=30).status_code == 200
    ok = requests.post(
        server.url + "/v1/segment",
        json={"query": QUERY, "frames": _jpegs(_frames(4))},
        headers=server.headers,
        timeout=300,
    )
    assert ok.status_code == 200 and len(ok.json()["masks"]) == 4, ok.text


RUNS = {
    "with the key": (fuzz_with_key, "with_key"),
    "without the key": (fuzz_without_key, "without_key"),
    "url-shaped": (fuzz_url_shaped, "url_shaped"),
    "on a video": (fuzz_on_video, "on_video"),
}


@pytest.mark.parametrize("what", list(RUNS))
def test_generated_requests_get_no_5xx_and_answers_the_schema_declares(serve_server, api_schema, what):
    run, size = RUNS[what]
    started = time.monotonic()
    report(what, run(serve_server, api_schema, getattr(DEFAULT, size)), started)
    assert_still_serving(serve_server)


@pytest.mark.slow
def test_a_larger_fuzz_run_gets_no_5xx_and_answers_the_schema_declares(serve_server, api_schema):
    for what, (run, size) in RUNS.items():
        started = time.monotonic()
        report(what, run(serve_server, api_schema, getattr(LARGE, size)), started)
    assert_still_serving(serve_server)


# ---- what the fuzz found, kept as regular tests ----


def test_every_operation_behind_the_key_declares_its_401(serve_server):
    # GET /v1/health/ready answered 401 without the key, a status its schema left out
    response = requests.get(serve_server.url + "/v1/health/ready", timeout=30)
    assert response.status_code == 401 and response.json()["error"]["field"] == "Authorization"
    schema = requests.get(serve_server.url + "/openapi.json", headers=serve_server.headers, timeout=30).json()
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            if f"{method.upper()} {path}" != LIVENESS:
                assert "401" in operation["responses"], f"{method.upper()} {path}"


INVALID_URLS = [
    "http://[::1/v.mp4?token=secret",  # an unclosed '[': urlsplit raises ValueError, which was a plain-text 500
    "https://[not-an-ip]/v.mp4?token=secret",
    "http://a\u2100b/v.mp4?token=secret",  # a host that NFKC normalization turns into a '/'
    "ftp://[::1/v.mp4?token=secret",  # refused for its scheme, and redacting it for the message raised too
]


@pytest.mark.parametrize("url", INVALID_URLS)
def test_a_video_url_that_urlsplit_rejects_gets_a_422_naming_the_field(serve_server, url):
    error = serve_server.refused_video_url(QUERY, url)
    assert "secret" not in error["message"], error


@pytest.mark.parametrize("url", INVALID_URLS)
def test_urls_that_urlsplit_rejects_are_refused_and_redacted(url, tmp_path):
    assert redact_url(url).endswith("://<invalid host>")
    with pytest.raises(URLRefusedError) as refused:
        fetch_url(url, tmp_path / "video", max_bytes=1000, timeout_s=5.0)
    assert "secret" not in str(refused.value)


def test_a_redirect_to_a_url_that_urlsplit_rejects_is_refused(monkeypatch, tmp_path):
    class Redirect:
        status = 302

        def getheader(self, name: str) -> str:
            return "http://[::1/v.mp4?token=secret"

    class Connection:
        def close(self) -> None:
            pass

    monkeypatch.setattr(url_fetch, "_checked_connection", lambda url, allow_private, deadline: Connection())
    monkeypatch.setattr(url_fetch, "_get", lambda connection, url, deadline: Redirect())
    with pytest.raises(URLRefusedError, match="redirects to a URL that is not valid") as refused:
        fetch_url("http://example.com/v.mp4", tmp_path / "video", max_bytes=1000, timeout_s=5.0)
    assert "secret" not in str(refused.value)
