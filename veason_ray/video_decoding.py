"""Frame sources: read and decode only the frames a sample needs, from a JPEG folder or an .mp4 video, through
the :class:`~veason_ray.object_store.ObjectStore` (local paths and s3:// alike).

    source = frame_source(dataset, "synth/v0000", video_format="jpeg")
    frames = source.read([0, 5, 11], size=560)      # (3, 560, 560, 3) uint8 RGB, bilinear

Layouts: ``jpeg`` is the readers' ``JPEGImages/<video>/<frame>.jpg`` (one URI per frame, from
:class:`~veason_ray.datasets.VideoInfo`); ``mp4`` is ``<root>/Videos/<video>.mp4`` (ours: one video file per
dataset video, frame i = the i-th decoded frame, as many frames as the expression file lists).

Bad data raises a :class:`BadDataError` subclass whose ``reason`` names the kind (``corrupt_frame``,
``missing_frame``, ``corrupt_video``, ``truncated_video``, ``frame_size``, ``timeout`` past a sample's deadline);
pipelines count those and go on.
Other errors (a storage outage, a bug) propagate. Messages name the URI, never credentials.
"""

from __future__ import annotations

import abc
import contextlib
import io
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, ClassVar, TypeVar

import cv2
import numpy as np

from veason_ray.datasets import VideoInfo, VOSDataset
from veason_ray.frames import resize_frames
from veason_ray.object_store import ObjectStore, join_uri

VIDEO_DIR = "Videos"  # mp4 layout: <root>/Videos/<video>.mp4
VIDEO_FORMATS = ("jpeg", "mp4")
VIDEO_BACKENDS = ("pyav", "decord")
_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_EOI_TAIL = 1024  # bytes at the end of a JPEG searched for its end marker (padding after it is tolerated)
_SEEK_GAP = 16  # frames: a later needed frame further than this from the decoder's position is sought to


class BadDataError(Exception):
    """Data that cannot be used (skipped and counted by pipelines); ``reason`` is a short metric name."""

    reason: ClassVar[str] = "bad_data"


class CorruptFrameError(BadDataError):
    """A frame file that does not decode (not a JPEG, truncated, wrong colour layout)."""

    reason = "corrupt_frame"


class MissingFrameError(BadDataError):
    """A frame or video file that is not in storage."""

    reason = "missing_frame"


class FrameSizeError(BadDataError):
    """A decoded frame whose size differs from the video's."""

    reason = "frame_size"


class CorruptVideoError(BadDataError):
    """A video container that cannot be opened or demuxed."""

    reason = "corrupt_video"


class TruncatedVideoError(BadDataError):
    """A video that ends (or stops decoding) before a needed frame."""

    reason = "truncated_video"


T = TypeVar("T")


class SampleTimeoutError(BadDataError):
    """Reading one sample took longer than its deadline (`data.sample_timeout_s`)."""

    reason = "timeout"


def within_deadline(read: Callable[[], T], timeout_s: float, what: str) -> T:
    """`read()` on a daemon thread, waited for at most `timeout_s`: SampleTimeoutError past it. A read that never
    returns (a stuck storage call, a decoder in a loop) then costs its sample, not the run; its thread is left
    to finish or die with the process."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = read()
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller below
            box["error"] = error
        finally:
            done.set()

    threading.Thread(target=run, name=f"read {what}", daemon=True).start()
    if not done.wait(timeout_s):
        raise SampleTimeoutError(f"{what}: not read in {timeout_s:g} s (data.sample_timeout_s)")
    if "error" in box:
        raise box["error"]
    return box["value"]


def decode_jpeg(data: bytes, uri: str = "jpeg") -> np.ndarray:
    """JPEG bytes -> (H, W, 3) uint8 RGB. CorruptFrameError when the bytes are not a complete JPEG (libjpeg
    would fill a truncated image with grey and only warn, so the start and end markers are checked)."""
    if not data.startswith(_JPEG_SOI) or data.rfind(_JPEG_EOI, max(0, len(data) - _EOI_TAIL)) < 0:
        raise CorruptFrameError(f"{uri}: not a complete JPEG ({len(data)} bytes)")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.ndim != 3 or image.shape[2] != 3:
        raise CorruptFrameError(f"{uri}: not a decodable image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _checked_indices(indices: Sequence[int], num_frames: int, name: str) -> list[int]:
    out = [int(i) for i in indices]
    for i in out:
        if not 0 <= i < num_frames:
            raise IndexError(f"video {name!r}: frame index {i} out of range [0, {num_frames})")
    return out


class FrameSource(abc.ABC):
    """The frames of one video, decoded on demand. ``size`` (H, W) is the original frame size in pixels."""

    def __init__(self, name: str, num_frames: int, size: tuple[int, int] | None):
        self.name, self.num_frames, self.size = name, num_frames, size

    @abc.abstractmethod
    def _decode(self, indices: list[int]) -> list[np.ndarray]:
        """(H, W, 3) uint8 RGB frames at ``indices`` (in that order; duplicates allowed)."""

    def read(self, indices: Sequence[int], size: int | None = None) -> np.ndarray:
        """(T, H, W, 3) uint8 RGB at ``indices``; with ``size``, resized to size x size (bilinear,
        :func:`~veason_ray.frames.resize_frames`)."""
        idx = _checked_indices(indices, self.num_frames, self.name)
        frames = self._decode(idx)
        for frame, i in zip(frames, idx, strict=True):
            if self.size is not None and frame.shape[:2] != tuple(self.size):
                raise FrameSizeError(
                    f"video {self.name!r} frame {i}: {frame.shape[1]}x{frame.shape[0]}, "
                    f"the video's size is {self.size[1]}x{self.size[0]}"
                )
        if size is not None:
            frames = [resize_frames(f, size) for f in frames]
        if not frames:
            edge = (size, size) if size is not None else tuple(self.size or (0, 0))
            return np.zeros((0, *edge, 3), np.uint8)
        return np.stack(frames)


class ArrayFrameSource(FrameSource):
    """Frames already in memory: (L, H, W, 3) uint8."""

    def __init__(self, name: str, frames: np.ndarray):
        super().__init__(name, len(frames), tuple(frames.shape[1:3]))
        self._frames = frames

    def _decode(self, indices: list[int]) -> list[np.ndarray]:
        return [self._frames[i] for i in indices]


class JpegFolderSource(FrameSource):
    """One JPEG per frame (``frame_uris`` in order): only the requested files are read."""

    def __init__(
        self, store: ObjectStore, name: str, frame_uris: Sequence[str], size: tuple[int, int] | None
    ):
        super().__init__(name, len(frame_uris), size)
        self.store, self.frame_uris = store, tuple(frame_uris)

    def _decode(self, indices: list[int]) -> list[np.ndarray]:
        out = []
        for i in indices:
            uri = self.frame_uris[i]
            try:
                data = self.store.read_bytes(uri)
            except FileNotFoundError as e:
                raise MissingFrameError(str(e)) from None
            out.append(decode_jpeg(data, uri))
        return out


@contextlib.contextmanager
def open_video_stream(f: BinaryIO, uri: str) -> Iterator[tuple[Any, Any]]:
    """PyAV's container of the open file ``f`` and its first video stream (threaded decoding); a file FFmpeg
    cannot open, or one without a video stream, raises CorruptVideoError naming ``uri``."""
    import av

    try:
        container = av.open(f, mode="r")
    except (av.FFmpegError, OSError, ValueError) as e:
        raise CorruptVideoError(f"{uri}: cannot open video ({type(e).__name__})") from None
    with container:
        if not container.streams.video:
            raise CorruptVideoError(f"{uri}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        yield container, stream


class Mp4Source(FrameSource):
    """An .mp4 (or any container FFmpeg reads) decoded with PyAV, seeking to the needed frames; ``decord`` as an
    optional backend. Frame i is the i-th frame in presentation order; ``num_frames`` is what the dataset's
    expression file lists (a video that decodes fewer raises TruncatedVideoError when a missing one is needed).
    """

    def __init__(
        self,
        store: ObjectStore,
        name: str,
        uri: str,
        num_frames: int,
        size: tuple[int, int] | None,
        backend: str = "pyav",
    ):
        if backend not in VIDEO_BACKENDS:
            raise ValueError(f"video backend {backend!r}: expected one of {VIDEO_BACKENDS}")
        super().__init__(name, num_frames, size)
        self.store, self.uri, self.backend = store, uri, backend

    def _decode(self, indices: list[int]) -> list[np.ndarray]:
        if not indices:
            return []
        wanted = sorted(set(indices))
        try:
            with self.store.open_input(self.uri) as f:
                decoded = (
                    self._decode_pyav(f, wanted) if self.backend == "pyav" else self._decode_decord(f, wanted)
                )
        except FileNotFoundError as e:
            raise MissingFrameError(str(e)) from None
        missing = [i for i in wanted if i not in decoded]
        if missing:
            got = max(decoded, default=-1) + 1
            raise TruncatedVideoError(
                f"{self.uri}: frame {missing[0]} not decodable (got frames up to {got - 1})"
            )
        return [decoded[i] for i in indices]

    def _decode_pyav(self, f, wanted: list[int]) -> dict[int, np.ndarray]:
        with open_video_stream(f, self.uri) as (container, stream):
            return self._decode_stream(container, stream, wanted)

    def _decode_stream(self, container, stream, wanted: list[int]) -> dict[int, np.ndarray]:
        """Decode forward through the needed frames (ascending ``wanted``), seeking to the keyframe before a
        needed frame that is more than _SEEK_GAP frames ahead. A frame's index comes from its timestamp
        (constant frame rate); without a usable frame rate the frames are counted from the start, no seeking."""
        import av

        rate, base = stream.average_rate or stream.guessed_rate, stream.time_base
        start = stream.start_time or 0
        by_time = bool(rate and base)
        wanted_set = set(wanted)
        out: dict[int, np.ndarray] = {}
        decoder, position, counted = None, -1, 0
        try:
            for target in wanted:
                jump = target - position > _SEEK_GAP
                if decoder is None or (by_time and jump):
                    if by_time and jump:
                        container.seek(int(start + target / (rate * base)), stream=stream, backward=True)
                    decoder = container.decode(stream)
                while position < target:
                    frame = next(decoder, None)
                    if frame is None:
                        return out  # end of stream: the frames still missing are reported as truncation
                    position = (
                        int(round(float((frame.pts - start) * base * rate)))
                        if by_time and frame.pts is not None
                        else counted
                    )
                    counted += 1
                    if position in wanted_set and position not in out:
                        out[position] = frame.to_ndarray(format="rgb24")
        except av.FFmpegError:
            pass  # a damaged packet ends decoding; the frames still missing are reported as truncation
        return out

    def _decode_decord(self, f, wanted: list[int]) -> dict[int, np.ndarray]:
        import decord

        try:
            reader = decord.VideoReader(io.BytesIO(f.read()), ctx=decord.cpu(0), num_threads=1)
        except (decord.DECORDError, RuntimeError) as e:  # decord reports an unreadable input as RuntimeError
            raise CorruptVideoError(f"{self.uri}: cannot open video ({type(e).__name__})") from None
        available = [i for i in wanted if i < len(reader)]
        if not available:
            return {}
        try:
            batch = reader.get_batch(available).asnumpy()
        except (decord.DECORDError, RuntimeError):
            raise TruncatedVideoError(f"{self.uri}: frames {available} not decodable") from None
        return dict(zip(available, batch, strict=True))


def video_uri(dataset: VOSDataset, video: str) -> str:
    """Where the mp4 layout keeps a video: ``<root>/Videos/<video>.mp4``."""
    return join_uri(dataset.root, VIDEO_DIR, f"{video}.mp4")


def frame_source(
    dataset: VOSDataset,
    video: str,
    video_format: str = "jpeg",
    backend: str = "pyav",
    info: VideoInfo | None = None,
) -> FrameSource:
    """The frames of ``video`` in ``dataset``: its JPEG folder or its .mp4 (see the module docstring)."""
    info = info or dataset.video(video)
    size = (info.height, info.width)
    if video_format == "jpeg":
        return JpegFolderSource(dataset.store, video, info.frame_uris, size)
    if video_format == "mp4":
        return Mp4Source(dataset.store, video, video_uri(dataset, video), info.num_frames, size, backend)
    raise ValueError(f"video format {video_format!r}: expected one of {VIDEO_FORMATS}")


__all__ = [
    "ArrayFrameSource",
    "BadDataError",
    "CorruptFrameError",
    "CorruptVideoError",
    "FrameSizeError",
    "FrameSource",
    "JpegFolderSource",
    "MissingFrameError",
    "Mp4Source",
    "TruncatedVideoError",
    "VideoTooLongError",
    "WholeVideo",
    "decode_jpeg",
    "frame_source",
    "read_whole_video",
    "video_uri",
]


# --- a whole video given by the user (`veason infer`, the Serve app) ----------------------------------------
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class VideoTooLongError(ValueError):
    """The video has more frames, or lasts longer, than the caller allows (every frame and its mask are held in
    memory)."""


class VideoTooLargeError(ValueError):
    """A frame of the video is larger than the caller allows."""


@dataclass(frozen=True)
class WholeVideo:
    """Every frame of a user's video: frames (L, H, W, 3) uint8 RGB, frame_names (the file stems of a frame
    folder, zero-padded indices for a video file) and its frame rate when the container has one."""

    uri: str
    frames: np.ndarray
    frame_names: tuple[str, ...]
    fps: float | None


@dataclass(frozen=True)
class VideoLimits:
    """What a caller accepts of a whole video: at most `max_frames` frames, `max_side` pixels on a frame's
    longer side and `max_duration_s` seconds of a video file (0 = no limit on the last two). Sizes and
    durations are checked from the container's header before any frame is decoded."""

    max_frames: int
    max_side: int = 0
    max_duration_s: float = 0.0

    def check_size(self, uri: str, width: int, height: int) -> None:
        if self.max_side and max(width, height) > self.max_side:
            raise VideoTooLargeError(
                f"{uri}: frames of {width}x{height}, larger than {self.max_side} pixels on the longer side"
            )

    def check_count(self, uri: str, count: int) -> None:
        if count > self.max_frames:
            raise VideoTooLongError(f"{uri}: more than the {self.max_frames} frames allowed")


def read_whole_video(store: ObjectStore, uri: str, limits: VideoLimits | int) -> WholeVideo:
    """Decode every frame of ``uri``: a video file (.mp4 or anything FFmpeg reads) or a folder of JPEG/PNG frames
    (sorted by name), local or s3://, within ``limits`` (a bare int is a frame limit). A video beyond them
    raises VideoTooLongError or VideoTooLargeError; an unreadable file or frame a BadDataError; a missing input
    FileNotFoundError."""
    limits = limits if isinstance(limits, VideoLimits) else VideoLimits(int(limits))
    folder = uri.rstrip("/")
    listed = store.list_files(folder)
    if listed == [folder]:
        return _read_video_file(store, folder, limits)
    names = [u for u in listed if u.rsplit("/", 1)[0] == folder and u.lower().endswith(IMAGE_EXTENSIONS)]
    if not names:
        raise FileNotFoundError(
            f"{uri}: neither a video file nor a folder of {'/'.join(IMAGE_EXTENSIONS)} frames"
        )
    limits.check_count(uri, len(names))
    frames = []
    for name in names:
        frames.append(decode_image(store.read_bytes(name), name))
        limits.check_size(name, frames[-1].shape[1], frames[-1].shape[0])
    stems = tuple(n.rsplit("/", 1)[-1].rsplit(".", 1)[0] for n in names)
    return WholeVideo(uri, stack_video_frames(frames, names), stems, None)


def decode_image(data: bytes, uri: str) -> np.ndarray:
    """JPEG or PNG bytes, told apart by their first bytes, -> (H, W, 3) uint8 RGB; anything else raises
    CorruptFrameError naming ``uri``."""
    if data.startswith(_JPEG_SOI):
        return decode_jpeg(data, uri)
    if not data.startswith(_PNG_SIGNATURE):
        raise CorruptFrameError(f"{uri}: neither a JPEG nor a PNG image")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise CorruptFrameError(f"{uri}: not a decodable image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def stack_video_frames(frames: Sequence[np.ndarray], names: Sequence[str]) -> np.ndarray:
    """(L, H, W, 3) from L frames of one size; a frame of another size raises FrameSizeError naming it."""
    first = frames[0].shape
    for frame, name in zip(frames, names, strict=True):
        if frame.shape != first:
            raise FrameSizeError(
                f"{name}: {frame.shape[1]}x{frame.shape[0]}, the first frame is {first[1]}x{first[0]}"
            )
    return np.stack(frames)


def _read_video_file(store: ObjectStore, uri: str, limits: VideoLimits) -> WholeVideo:
    import av

    frames: list[np.ndarray] = []
    with store.open_input(uri) as f:
        with open_video_stream(f, uri) as (container, stream):
            rate = stream.average_rate or stream.guessed_rate
            limits.check_size(uri, stream.codec_context.width, stream.codec_context.height)
            duration = _duration_s(container, stream)
            if limits.max_duration_s and duration and duration > limits.max_duration_s:
                raise VideoTooLongError(
                    f"{uri}: {duration:.1f} s long, longer than the {limits.max_duration_s:g} s allowed"
                )
            try:
                for frame in container.decode(stream):
                    limits.check_count(uri, len(frames) + 1)
                    frames.append(frame.to_ndarray(format="rgb24"))
                    limits.check_size(uri, frames[-1].shape[1], frames[-1].shape[0])
            except av.FFmpegError as e:
                if not frames:
                    raise CorruptVideoError(f"{uri}: no decodable frame ({type(e).__name__})") from None
    if not frames:
        raise CorruptVideoError(f"{uri}: no decodable frame")
    width = max(5, len(str(len(frames) - 1)))
    names = tuple(str(i).zfill(width) for i in range(len(frames)))
    return WholeVideo(uri, stack_video_frames(frames, names), names, float(rate) if rate else None)


def _duration_s(container: Any, stream: Any) -> float | None:
    """The video's length in seconds from its stream or container header, when either says."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # av.time_base
    return None
