"""serve/url_fetch.py against real HTTP and HTTPS servers on 127.0.0.1 (ThreadingHTTPServer in a thread).

The servers' endpoints: /small, /host (echoes the Host header), /large (with Content-Length), /large-unsized
(ends when the connection closes), /large-chunked, /redirect?to=<quoted URL>, /loop (redirects to itself),
/slow (answers after SLOW_S), /drip (one byte every 0.1 s), anything else 404. Refused URLs are refused before
any connection; the address check itself is tested on addresses built here, since no public host is reachable.
"""

from __future__ import annotations

import http.server
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, unquote

import pytest

from serve import url_fetch
from serve.url_fetch import URLFetchError, URLRefusedError, fetch_url, redact_url

SMALL = bytes(range(256)) * 4
LARGE = bytes(range(251)) * 1200  # 301,200 bytes: several 64 KiB chunks
SLOW_S = 3.0


class _Endpoints(http.server.BaseHTTPRequestHandler):
    """GET <path> answers with the method get_<path> (dashes as underscores); requests counted per path."""

    def do_GET(self) -> None:
        path, _, self.query = self.path.partition("?")
        self.server.hits[path] = self.server.hits.get(path, 0) + 1
        getattr(self, "get_" + path.strip("/").replace("-", "_"), self.get_missing)()

    def answer(self, status: int, body: bytes, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def get_small(self) -> None:
        self.answer(200, SMALL)

    def get_host(self) -> None:
        self.answer(200, self.headers["Host"].encode())

    def get_large(self) -> None:
        self.answer(200, LARGE)

    def get_large_unsized(self) -> None:  # HTTP/1.0 without Content-Length: the body ends at close
        self.send_response(200)
        self.end_headers()
        self.wfile.write(LARGE)

    def get_large_chunked(self) -> None:
        self.protocol_version = "HTTP/1.1"
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for start in range(0, len(LARGE), 50_000):
            piece = LARGE[start : start + 50_000]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")
        self.close_connection = True

    def get_redirect(self) -> None:
        self.answer(302, b"", Location=unquote(self.query.removeprefix("to=")))

    def get_loop(self) -> None:
        self.answer(301, b"", Location="/loop")

    def get_slow(self) -> None:
        time.sleep(SLOW_S)
        self.answer(200, SMALL)

    def get_drip(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "50")
        self.end_headers()
        for _ in range(50):
            self.wfile.write(b"x")
            time.sleep(0.1)

    def get_missing(self) -> None:
        self.answer(404, b"not found")

    def log_message(self, format: str, *args) -> None:  # keep the test output clean
        pass


class _TestServer(http.server.ThreadingHTTPServer):
    """The endpoints on a free port of 127.0.0.1; a client hanging up early (size cap, timeout) is expected."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Endpoints)
        self.hits: dict[str, int] = {}

    def handle_error(self, request, client_address) -> None:
        pass


@contextmanager
def _running(server: _TestServer) -> Iterator[_TestServer]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def server() -> Iterator[_TestServer]:
    with _running(_TestServer()) as running:
        yield running


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[_TestServer, Path]]:
    """The endpoints over TLS with a self-signed certificate for the name `localhost` only; yields the server
    and the certificate file (to trust through SSL_CERT_FILE)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    options = "-x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 -subj /CN=localhost"
    command = ["openssl", "req", *options.split(), "-addext", "subjectAltName=DNS:localhost"]
    subprocess.run([*command, "-keyout", key, "-out", cert], check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    tls = _TestServer()
    tls.socket = context.wrap_socket(tls.socket, server_side=True)
    with _running(tls) as running:
        yield running, cert


def _url(server: _TestServer, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
    return f"{scheme}://{host}:{server.server_address[1]}{path}"


def _fetch(url: str, destination: Path, **kwargs) -> int:
    options = {"max_bytes": 1_000_000, "timeout_s": 5.0, "allow_private": True} | kwargs
    return fetch_url(url, destination, **options)


@pytest.mark.parametrize(
    ("path", "body"), [("/small", SMALL), ("/large-unsized", LARGE), ("/large-chunked", LARGE)]
)
def test_downloads_the_exact_bytes_up_to_the_cap(server, tmp_path, path, body):
    destination = tmp_path / "video"
    assert _fetch(_url(server, path), destination, max_bytes=len(body)) == len(body)
    assert destination.read_bytes() == body


def test_host_header_names_the_host_not_the_address(server, tmp_path):
    _fetch(_url(server, "/host", host="localhost"), tmp_path / "host")
    assert (tmp_path / "host").read_text() == f"localhost:{server.server_address[1]}"


def test_connects_to_the_address_it_checked(server, tmp_path, monkeypatch):
    """DNS rebinding: a second lookup of the name would answer an unreachable address (TEST-NET-1); the
    fetch never asks twice."""
    real_getaddrinfo, lookups = socket.getaddrinfo, []

    def rebinding(host, port, *args, **kwargs):
        lookups.append(host)
        return real_getaddrinfo(host if len(lookups) == 1 else "192.0.2.1", port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    _fetch(_url(server, "/small", host="localhost"), tmp_path / "small", timeout_s=2.0)
    assert lookups == ["localhost"]
    assert (tmp_path / "small").read_bytes() == SMALL


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "localhost", "10.1.2.3", "192.168.0.1", "169.254.169.254", "[::1]", "[::ffff:127.0.0.1]"],
)
def test_refuses_hosts_that_are_not_public(server, tmp_path, host):
    with pytest.raises(URLRefusedError, match="not a public address") as refused:
        _fetch(_url(server, "/refused?token=secret", host=host), tmp_path / "out", allow_private=False)
    assert "secret" not in str(refused.value)
    assert "/refused" not in server.hits
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("ftp://example.com/video.mp4?token=secret", "only http and https"),
        ("file:///etc/passwd", "only http and https"),
        ("example.com/video.mp4", "only http and https"),
        ("http://user:secret@127.0.0.1/video.mp4", "credentials"),
        ("https://@example.com/video.mp4", "credentials"),
        ("http:///video.mp4?token=secret", "no host"),
        ("http://127.0.0.1:99999/video.mp4", "invalid port"),
        ("http://127.0.0.1/a video.mp4?token=secret", "spaces or control characters"),
    ],
)
def test_refuses_malformed_urls_without_echoing_secrets(tmp_path, url, problem):
    with pytest.raises(URLRefusedError, match=problem) as refused:
        _fetch(url, tmp_path / "out")
    assert "secret" not in str(refused.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path", ["/large", "/large-unsized", "/large-chunked"])
def test_size_cap_sets_too_large_and_leaves_no_file(server, tmp_path, path):
    with pytest.raises(URLFetchError, match="larger than the limit of 100000 bytes") as failed:
        _fetch(_url(server, path), tmp_path / "out", max_bytes=100_000)
    assert failed.value.too_large
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path", ["/slow", "/drip"])
def test_timeout_is_a_deadline_for_the_whole_fetch(server, tmp_path, path):
    """/slow sends nothing; /drip sends a byte every 0.1 s, so no single read ever waits the timeout."""
    start = time.monotonic()
    with pytest.raises(URLFetchError, match="timed out after 0.8 s") as failed:
        _fetch(_url(server, path), tmp_path / "out", timeout_s=0.8)
    assert time.monotonic() - start < 1.8
    assert not failed.value.too_large
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["/small", "small", "http://127.0.0.1:{port}/small"])
def test_follows_redirects(server, tmp_path, target):
    target = target.format(port=server.server_address[1])
    _fetch(_url(server, "/redirect?to=" + quote(target, safe="")), tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == SMALL


def test_redirect_loop_stops_after_max_redirects(server, tmp_path):
    before = server.hits.get("/loop", 0)
    with pytest.raises(URLFetchError, match="more than 3 redirects"):
        _fetch(_url(server, "/loop"), tmp_path / "out", max_redirects=3)
    assert server.hits["/loop"] - before == 4
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("target", "error"),
    [
        ("http://169.254.169.254/latest/meta-data/?token=secret", "not a public address"),
        ("http://10.0.0.1/admin?token=secret", "not a public address"),
        ("ftp://127.0.0.1/video.mp4?token=secret", "only http and https"),
        ("http://user:secret@127.0.0.1/video.mp4", "credentials"),
    ],
)
def test_every_redirect_is_checked_again(server, tmp_path, monkeypatch, target, error):
    """The first hop passes (127.0.0.1 counts as public here); the redirect it answers is refused."""
    monkeypatch.setattr(url_fetch, "_is_public_address", lambda address: address == "127.0.0.1")
    before = server.hits.get("/redirect", 0)
    with pytest.raises(URLRefusedError, match=error) as refused:
        _fetch(_url(server, "/redirect?to=" + quote(target, safe="")), tmp_path / "out", allow_private=False)
    assert server.hits["/redirect"] - before == 1
    assert "secret" not in str(refused.value)


def test_http_error_status(server, tmp_path):
    with pytest.raises(URLFetchError, match="HTTP 404") as failed:
        _fetch(_url(server, "/nothing-here?token=secret"), tmp_path / "out")
    assert not failed.value.too_large
    assert "secret" not in str(failed.value)
    assert not (tmp_path / "out").exists()


def test_https_checks_the_certificate_against_the_name(tls_server, tmp_path, monkeypatch):
    """The socket goes to the pinned 127.0.0.1, but SNI and the certificate check use `localhost`: the same
    server fails by address, since its certificate names `localhost` only."""
    tls, cert = tls_server
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    _fetch(_url(tls, "/small", host="localhost", scheme="https"), tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == SMALL
    with pytest.raises(URLFetchError, match="CERTIFICATE_VERIFY_FAILED"):
        _fetch(_url(tls, "/small", scheme="https"), tmp_path / "by-address")
    assert not (tmp_path / "by-address").exists()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:pw@Example.com:8443/a/b.mp4?token=secret#part", "https://example.com:8443/a/b.mp4"),
        ("http://[::1]:8080/x?y=1", "http://[::1]:8080/x"),
        ("http://example.com", "http://example.com"),
        ("http://example.com:99999/x?token=secret", "http://example.com/x"),
    ],
)
def test_redact_url(url, shown):
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("1.1.1.1", True),
        ("2001:4860:4860::8888", True),
        ("::ffff:8.8.8.8", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("172.16.5.4", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("224.0.0.1", False),
        ("240.0.0.1", False),
        ("0.0.0.0", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("::ffff:169.254.169.254", False),
    ],
)
def test_is_public_address(address, public):
    assert url_fetch._is_public_address(address) is public
