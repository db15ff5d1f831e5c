"""A request's video, decoded within the server's limits: an uploaded file, an http(s):// or s3:// URL, or
frames sent as base64 images. Every refusal is a `RequestError` naming the request field and the problem,
answered with a 4xx; nothing here logs or repeats a URL's query string.

The limits (`serve.*`): bytes (`max_upload_mb`), frames (`max_frames`), seconds (`max_duration_s`) and frame
size (`max_side`); sizes and durations are read from the container's header before any frame is decoded.
"""

from __future__ import annotations

import base64
import binascii
import tempfile
from pathlib import Path

from serve.url_fetch import URLFetchError, URLRefusedError, fetch_url, redact_url
from veason_ray.config import ServeConfig, StorageConfig
from veason_ray.object_store import LocalObjectStore, is_s3_uri, store_for
from veason_ray.video_decoding import (
    BadDataError,
    VideoLimits,
    VideoTooLargeError,
    VideoTooLongError,
    WholeVideo,
    decode_image,
    read_whole_video,
    stack_video_frames,
)


class RequestError(Exception):
    """A request the server will not serve: HTTP `status`, the request `field` at fault and why."""

    def __init__(self, status: int, field: str | None, message: str):
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


def max_bytes(settings: ServeConfig) -> int:
    return int(settings.max_upload_mb * 1024 * 1024)


def video_limits(settings: ServeConfig) -> VideoLimits:
    return VideoLimits(settings.max_frames, settings.max_side, settings.max_duration_s)


def read_video(store_uri: str, shown_as: str, field: str, settings: ServeConfig, storage=None) -> WholeVideo:
    """Decode the video at `store_uri` (a local file, or s3://) within the limits; `shown_as` names it in
    messages (an upload's file name, a redacted URL)."""
    store = store_for(store_uri, storage) if is_s3_uri(store_uri) else LocalObjectStore()
    try:
        video = read_whole_video(store, store_uri, video_limits(settings))
    except (VideoTooLongError, VideoTooLargeError) as error:
        raise RequestError(422, field, _renamed(error, store_uri, shown_as)) from None
    except BadDataError as error:
        raise RequestError(400, field, _renamed(error, store_uri, shown_as)) from None
    except FileNotFoundError:
        raise RequestError(422, field, f"{shown_as}: no video there") from None
    return video


def _renamed(error: Exception, uri: str, shown_as: str) -> str:
    return str(error).replace(uri.rstrip("/"), shown_as)


def check_size(size: int, field: str, settings: ServeConfig) -> None:
    if size > max_bytes(settings):
        raise RequestError(
            413, field, f"{size / 2**20:.1f} MiB, more than the {settings.max_upload_mb:g} MiB allowed"
        )


def video_from_url(url: str, workdir: Path, settings: ServeConfig, storage: StorageConfig) -> WholeVideo:
    """The video at an http(s):// URL (downloaded into `workdir`, guarded against server-side request
    forgery: serve/url_fetch.py) or at an s3:// URI (a video file or a folder of frames)."""
    field = "video_url"
    if is_s3_uri(url):
        store = store_for(url, storage)
        try:
            listed = store.list_files(url.rstrip("/"))
        except (OSError, ValueError) as error:
            raise RequestError(422, field, f"{url}: cannot be listed ({type(error).__name__})") from None
        if listed == [url.rstrip("/")]:
            check_size(store.file_size(url.rstrip("/")), field, settings)
        return read_video(url, url, field, settings, storage)
    if not url.lower().startswith(("http://", "https://")):
        raise RequestError(422, field, f"{redact_url(url)}: expected an http://, https:// or s3:// URL")
    destination = workdir / "video"
    try:
        fetch_url(
            url,
            destination,
            max_bytes=max_bytes(settings),
            timeout_s=settings.url_timeout_s,
            allow_private=settings.allow_private_urls,
        )
    except URLRefusedError as error:
        raise RequestError(422, field, str(error)) from None
    except URLFetchError as error:
        raise RequestError(413 if error.too_large else 422, field, str(error)) from None
    return read_video(str(destination), redact_url(url), field, settings)


def video_from_upload(path: Path, filename: str, settings: ServeConfig) -> WholeVideo:
    """An uploaded video file already on disk (its size checked as it arrived)."""
    return read_video(str(path), filename or "the upload", "file", settings)


def video_from_frames(frames: list[str], fps: float | None, settings: ServeConfig) -> WholeVideo:
    """Frames sent as base64 JPEG or PNG images, in order, all of one size."""
    if len(frames) > settings.max_frames:
        raise RequestError(
            422, "frames", f"{len(frames)} frames, more than the {settings.max_frames} allowed"
        )
    check_size(sum(len(f) for f in frames) * 3 // 4, "frames", settings)
    limits = video_limits(settings)
    images = []
    for index, text in enumerate(frames):
        field = f"frames.{index}"
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, field, "not valid base64") from None
        try:
            image = decode_image(data, field)
            limits.check_size(field, image.shape[1], image.shape[0])
        except VideoTooLargeError as error:
            raise RequestError(422, field, str(error).removeprefix(f"{field}: ")) from None
        except BadDataError as error:
            raise RequestError(400, field, str(error).removeprefix(f"{field}: ")) from None
        images.append(image)
    names = tuple(str(i).zfill(5) for i in range(len(images)))
    try:
        stacked = stack_video_frames(images, [f"frames.{i}" for i in range(len(images))])
    except BadDataError as error:
        raise RequestError(422, "frames", str(error)) from None
    return WholeVideo("frames", stacked, names, fps or settings.default_fps)


def request_workdir() -> tempfile.TemporaryDirectory:
    """A private folder for one request's downloaded or uploaded video, removed when the request ends."""
    return tempfile.TemporaryDirectory(prefix="veason-serve-")
