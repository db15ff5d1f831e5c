"""Download a user-supplied http(s) URL to a file without letting the user aim the server at our own network.

A request may name its video by URL. Fetched naively, that is a server-side request forgery hole: the URL, or a
redirect it answers with, can point at 127.0.0.1, the cloud metadata service at 169.254.169.254 or a host on
the cluster's private network. So every hop is checked (http or https, no credentials in the URL, every
address the host resolves to global) and the connection then goes to the address that was checked instead of
resolving the name a second time: a DNS answer that changes between the check and the connect (DNS
rebinding) cannot send us elsewhere. Over https the certificate check and SNI still use the name.

``timeout_s`` is a wall-clock deadline for the whole fetch (connect, every read, every redirect) and
``max_bytes`` caps the body whether or not the server sends Content-Length; a partial file is deleted on any
failure. Messages name URLs by :func:`redact_url`, never with their query string. Standard library only.
"""

from __future__ import annotations

import http.client
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urljoin, urlsplit

CHUNK_BYTES = 64 * 1024  # one read of the body while streaming it to the file
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
DEFAULT_PORTS = {"http": 80, "https": 443}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class URLRefusedError(ValueError):
    """The URL may not be fetched: bad scheme, no host, credentials in it, or a host that resolves to a
    loopback / private / link-local / multicast / reserved / unspecified address (unless allowed). -> HTTP 400"""


class URLFetchError(RuntimeError):
    """The fetch failed: connection error, timeout, HTTP status >= 400, too large, too many redirects.
    ``too_large`` is True when the size cap was hit, so callers can answer 413."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


def redact_url(url: str) -> str:
    """The URL for logs and error messages: scheme://host[:port]/path, never the query string, fragment or
    userinfo; `scheme://<invalid host>` for a URL whose host urlsplit rejects (an unclosed '[', say)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        scheme = _SCHEME.match(url)
        return f"{scheme.group(1).lower() if scheme else ''}://<invalid host>"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:  # out of range: leave it out rather than fail while reporting
        port = None
    return f"{parts.scheme}://{host if port is None else f'{host}:{port}'}{parts.path}"


def _is_public_address(address: str) -> bool:
    """True when the IP literal ``address`` is globally routable; an IPv4-mapped IPv6 address
    (``::ffff:127.0.0.1``) is judged by the IPv4 address inside it."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    special = ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast
    # is_global also rules out what the flags miss, e.g. 100.64.0.0/10 (carrier-grade NAT)
    return ip.is_global and not (special or ip.is_reserved or ip.is_unspecified)


class _Deadline:
    """The wall-clock end of one fetch; ``remaining()`` is how long the next socket operation may wait."""

    def __init__(self, seconds: float, shown_url: str) -> None:
        self.seconds, self.shown_url = seconds, shown_url
        self.end = time.monotonic() + seconds

    def expired(self) -> URLFetchError:
        return URLFetchError(f"fetching {self.shown_url} timed out after {self.seconds:g} s")

    def remaining(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise self.expired()
        return left


class _DeadlineReceive:
    """Sets the socket timeout to the fetch's remaining time before every receive (http.client reads through
    ``recv_into``), so a server that drips bytes cannot stretch the fetch past its deadline."""

    deadline: _Deadline

    def recv_into(self, *args, **kwargs) -> int:
        self.settimeout(self.deadline.remaining())
        return super().recv_into(*args, **kwargs)


class _DeadlineSocket(_DeadlineReceive, socket.socket):
    pass


class _DeadlineSSLSocket(_DeadlineReceive, ssl.SSLSocket):
    pass


def _connect(addresses: list[tuple[int, tuple]], deadline: _Deadline) -> _DeadlineSocket:
    """A TCP connection to the first of the checked ``(family, sockaddr)`` pairs that answers."""
    error: OSError | None = None
    for family, sockaddr in addresses:
        sock = _DeadlineSocket(family, socket.SOCK_STREAM)
        sock.deadline = deadline
        try:
            sock.settimeout(deadline.remaining())
            sock.connect(sockaddr)
            return sock
        except BaseException as exc:
            sock.close()
            if not isinstance(exc, OSError):
                raise
            error = exc
    assert error is not None  # getaddrinfo answers at least one address or raises
    raise error


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to addresses resolved and checked beforehand: ``connect()`` does not look the host
    up again, while the Host header still names it."""

    def __init__(self, host: str, port: int, addresses: list, deadline: _Deadline, **kwargs) -> None:
        super().__init__(host, port, **kwargs)
        self.addresses, self.deadline = addresses, deadline

    def connect(self) -> None:
        self.sock = _connect(self.addresses, self.deadline)


class _PinnedHTTPSConnection(_PinnedHTTPConnection, http.client.HTTPSConnection):
    """The same over TLS: the socket goes to the pinned address, certificate checking and SNI use the name."""

    def __init__(self, host: str, port: int, addresses: list, deadline: _Deadline) -> None:
        self.tls_context = ssl.create_default_context()
        self.tls_context.sslsocket_class = _DeadlineSSLSocket
        super().__init__(host, port, addresses, deadline, context=self.tls_context)

    def connect(self) -> None:
        super().connect()
        self.sock = self.tls_context.wrap_socket(self.sock, server_hostname=self.host)
        self.sock.deadline = self.deadline


def _checked_connection(url: str, allow_private: bool, deadline: _Deadline) -> _PinnedHTTPConnection:
    """An unopened connection for ``url``, pinned to the addresses its host resolves to; URLRefusedError
    when the URL may not be fetched."""
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
    except ValueError:  # an unclosed '[', a bracketed host that is no IP address, ...
        raise URLRefusedError(f"refused {shown}: not a valid URL") from None
    if parts.scheme not in DEFAULT_PORTS:
        raise URLRefusedError(f"refused {shown}: only http and https URLs may be fetched")
    if "@" in parts.netloc:
        raise URLRefusedError(f"refused {shown}: credentials in the URL are not allowed")
    if not parts.hostname:
        raise URLRefusedError(f"refused {shown}: the URL names no host")
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError:
        raise URLRefusedError(f"refused {shown}: invalid port") from None
    try:  # getaddrinfo takes no timeout: the system resolver's own applies
        found = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (OSError, ValueError) as exc:
        raise URLFetchError(f"could not resolve the host of {shown}: {exc}") from None
    addresses = [(family, sockaddr) for family, _, _, _, sockaddr in found]
    refused = [sockaddr[0] for _, sockaddr in addresses if not _is_public_address(sockaddr[0])]
    if refused and not allow_private:
        raise URLRefusedError(f"refused {shown}: its host resolves to {refused[0]}, not a public address")
    connection_class = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
    return connection_class(parts.hostname, port, addresses, deadline)


@contextmanager
def _as_fetch_error(shown: str, deadline: _Deadline) -> Iterator[None]:
    """Socket and protocol errors of the block as URLFetchError; a socket timeout is the deadline's."""
    try:
        yield
    except TimeoutError:
        raise deadline.expired() from None
    except (OSError, http.client.HTTPException) as exc:
        raise URLFetchError(f"could not fetch {shown}: {exc}") from None


def _get(connection: _PinnedHTTPConnection, url: str, deadline: _Deadline) -> http.client.HTTPResponse:
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    with _as_fetch_error(redact_url(url), deadline):
        try:
            connection.request("GET", target, headers={"User-Agent": "veason-ray"})
        except http.client.InvalidURL:  # its message repeats the query string
            raise URLRefusedError(
                f"refused {redact_url(url)}: spaces or control characters in the URL"
            ) from None
        return connection.getresponse()


def _save_body(
    response: http.client.HTTPResponse, shown: str, destination: Path, max_bytes: int, deadline: _Deadline
) -> int:
    too_large = URLFetchError(f"{shown} is larger than the limit of {max_bytes} bytes", too_large=True)
    if response.length is not None and response.length > max_bytes:
        raise too_large
    written = 0
    try:
        with destination.open("wb") as file:
            while True:
                with _as_fetch_error(shown, deadline):
                    chunk = response.read(CHUNK_BYTES)
                if not chunk:
                    return written
                written += len(chunk)
                if written > max_bytes:
                    raise too_large
                file.write(chunk)
    except BaseException:
        destination.unlink(missing_ok=True)
        raise


def fetch_url(
    url: str,
    destination: str | Path,
    *,
    max_bytes: int,
    timeout_s: float,
    allow_private: bool = False,
    max_redirects: int = 3,
) -> int:
    """Download url into destination (a file path); returns the bytes written.

    ``timeout_s`` (seconds) bounds the whole fetch, ``max_bytes`` the body; each of at most ``max_redirects``
    redirects is checked like the URL itself. Raises URLRefusedError for a URL or redirect that may not be
    fetched, URLFetchError when the fetch fails (``too_large`` set when the cap was hit)."""
    deadline = _Deadline(timeout_s, redact_url(url))
    for _ in range(max_redirects + 1):
        shown = redact_url(url)
        connection = _checked_connection(url, allow_private, deadline)
        try:
            response = _get(connection, url, deadline)
            if response.status in REDIRECT_STATUSES:
                location = response.getheader("Location")
                if not location:
                    raise URLFetchError(f"{shown} answered HTTP {response.status} without a Location")
                try:
                    url = urljoin(url, location)
                except ValueError:
                    raise URLRefusedError(
                        f"refused {shown}: it redirects to a URL that is not valid"
                    ) from None
                continue
            if response.status >= 300:
                raise URLFetchError(f"fetching {shown} failed: HTTP {response.status} {response.reason}")
            return _save_body(response, shown, Path(destination), max_bytes, deadline)
        finally:
            connection.close()
    raise URLFetchError(f"fetching {deadline.shown_url}: more than {max_redirects} redirects")
