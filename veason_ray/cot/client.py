"""An asynchronous client for OpenAI-compatible chat completions (the CoT teacher's endpoint).

    endpoint = TeacherEndpoint.resolve(base_url="", model="seed-1.5-vl", api_key="")  # env fills the blanks
    async with ChatCompletionsClient(endpoint, RetryPolicy(), concurrency=32) as client:
        reply = await client.complete(messages, max_tokens=1024, temperature=0.7)

At most ``concurrency`` requests are in flight. A request that gets 408, 409, 429 or a 5xx status, times out
(``timeout_s`` for the whole request) or loses its connection is retried up to ``max_retries`` times, waiting
``uniform(0, min(backoff_max_s, backoff_base_s * 2**retry))`` seconds (exponential backoff with full jitter) or
the server's Retry-After when it asks for longer (capped at ``backoff_max_s``). Other statuses fail at once.
The API key is sent as a Bearer token and never appears in a repr, log line or error message.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

RETRY_STATUSES = frozenset({408, 409, 429})
_BODY_EXCERPT = 300  # characters of an error response kept in the error message


class TeacherConfigError(ValueError):
    """The endpoint is not configured; the message names the config field and the environment variable."""


class TeacherRequestError(RuntimeError):
    """A request that failed for good: ``status`` (None for timeouts and connection errors) and ``attempts``."""

    def __init__(self, message: str, status: int | None, attempts: int):
        super().__init__(message)
        self.status, self.attempts = status, attempts


@dataclass(frozen=True)
class TeacherEndpoint:
    """Where the teacher is: ``base_url`` (e.g. http://host:8000/v1), ``model``, ``api_key`` (may be empty)."""

    base_url: str
    model: str
    api_key: str = field(default="", repr=False)

    @classmethod
    def resolve(cls, base_url: str, model: str, api_key: str) -> TeacherEndpoint:
        """Config values, each empty one taken from OPENAI_BASE_URL / OPENAI_MODEL / OPENAI_API_KEY."""
        base_url = base_url or os.environ.get("OPENAI_BASE_URL", "")
        model = model or os.environ.get("OPENAI_MODEL", "")
        if not base_url:
            raise TeacherConfigError("cot.base_url is empty and OPENAI_BASE_URL is not set: set one of them")
        if not base_url.startswith(("http://", "https://")):
            raise TeacherConfigError(f"cot.base_url {base_url!r}: expected an http:// or https:// URL")
        if not model:
            raise TeacherConfigError("cot.model is empty and OPENAI_MODEL is not set: name the teacher model")
        return cls(base_url.rstrip("/"), model, api_key or os.environ.get("OPENAI_API_KEY", ""))

    @property
    def chat_url(self) -> str:
        return f"{self.base_url}/chat/completions"


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of one request: ``max_retries`` after the first attempt; waits in seconds."""

    max_retries: int = 5
    timeout_s: float = 120.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0

    def delay(self, retry: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait before retry number ``retry`` (0-based): full jitter, or Retry-After if longer."""
        jittered = rng.uniform(0.0, min(self.backoff_max_s, self.backoff_base_s * 2**retry))
        return min(self.backoff_max_s, max(jittered, retry_after or 0.0))


@dataclass(frozen=True)
class ChatReply:
    """The first choice of a completion: its text (None when the server sent none), finish reason, attempts."""

    text: str | None
    finish_reason: str | None
    attempts: int
    usage: dict[str, Any] = field(default_factory=dict)


def image_data_url(jpeg: bytes) -> str:
    """A data URL of JPEG bytes, as chat completions take images."""
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class _Retryable(Exception):
    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


class ChatCompletionsClient:
    """Chat completions against one endpoint with bounded concurrency and retries (see the module docstring)."""

    def __init__(self, endpoint: TeacherEndpoint, retry: RetryPolicy, concurrency: int = 32, seed: int = 0):
        if concurrency < 1:
            raise ValueError(f"cot.concurrency must be >= 1, got {concurrency}")
        self.endpoint, self.retry = endpoint, retry
        self._slots = asyncio.Semaphore(concurrency)
        self._concurrency = concurrency
        self._rng = random.Random(seed)
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"ChatCompletionsClient(base_url={self.endpoint.base_url!r}, model={self.endpoint.model!r})"

    async def __aenter__(self) -> ChatCompletionsClient:
        headers = {"Content-Type": "application/json"}
        if self.endpoint.api_key:
            headers["Authorization"] = f"Bearer {self.endpoint.api_key}"
        connector = aiohttp.TCPConnector(limit=self._concurrency)
        self._session = aiohttp.ClientSession(headers=headers, connector=connector)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _scrub(self, text: str) -> str:
        key = self.endpoint.api_key
        return text.replace(key, "***") if key else text

    async def complete(self, messages: list[dict[str, Any]], **params: Any) -> ChatReply:
        """The first choice of ``POST {base_url}/chat/completions`` with ``messages`` and ``params``
        (max_tokens, temperature, ...); TeacherRequestError once the retries are spent or on a final status."""
        if self._session is None:
            raise RuntimeError("use the client inside `async with ChatCompletionsClient(...)`")
        body = {"model": self.endpoint.model, "messages": messages, **params}
        last: _Retryable | None = None
        for attempt in range(self.retry.max_retries + 1):
            if attempt:
                await asyncio.sleep(
                    self.retry.delay(attempt - 1, last.retry_after if last else None, self._rng)
                )
            try:
                async with self._slots:
                    return await self._post(body, attempt + 1)
            except _Retryable as e:
                last = e
        assert last is not None
        raise TeacherRequestError(
            self._scrub(
                f"{self.endpoint.chat_url}: gave up after {self.retry.max_retries + 1} attempts: {last}"
            ),
            last.status,
            self.retry.max_retries + 1,
        )

    async def _post(self, body: dict[str, Any], attempt: int) -> ChatReply:
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(total=self.retry.timeout_s)
        try:
            async with self._session.post(self.endpoint.chat_url, json=body, timeout=timeout) as response:
                text = await response.text(errors="replace")
                status = response.status
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
        except asyncio.TimeoutError:
            raise _Retryable(f"timed out after {self.retry.timeout_s:g} s") from None
        except aiohttp.ClientError as e:  # connection refused or reset, payload cut short, ...
            raise _Retryable(f"{type(e).__name__}: {self._scrub(str(e))}") from None
        excerpt = self._scrub(text[:_BODY_EXCERPT])
        if status in RETRY_STATUSES or status >= 500:
            raise _Retryable(f"HTTP {status}: {excerpt}", status, retry_after)
        if status != 200:
            raise TeacherRequestError(f"{self.endpoint.chat_url}: HTTP {status}: {excerpt}", status, attempt)
        return self._reply(text, attempt)

    def _reply(self, text: str, attempts: int) -> ChatReply:
        """The first choice of a 200 response body."""
        try:
            doc = json.loads(text)
            choice = doc["choices"][0]
            message = choice.get("message") or {}
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise TeacherRequestError(
                self._scrub(f"{self.endpoint.chat_url}: not a chat completion: {text[:_BODY_EXCERPT]!r}"),
                200,
                attempts,
            ) from None
        content = message.get("content")
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return ChatReply(
            text=content if isinstance(content, str) else None,
            finish_reason=choice.get("finish_reason"),
            attempts=attempts,
            usage=doc.get("usage") or {},
        )
