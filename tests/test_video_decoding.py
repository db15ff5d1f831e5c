"""Frame sources: JPEG folders and .mp4 videos decoded through the ObjectStore, typed errors for bad data."""

from __future__ import annotations

import io
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from veason_ray.frames import resize_frames
from veason_ray.object_store import LocalObjectStore
from veason_ray.video_decoding import (
    CorruptFrameError,
    CorruptVideoError,
    FrameSizeError,
    JpegFolderSource,
    MissingFrameError,
    Mp4Source,
    TruncatedVideoError,
    decode_jpeg,
)


def write_mp4(path: Path, frames: np.ndarray, faststart: bool = True, fps: int = 10) -> None:
    """(T, H, W, 3) uint8 RGB -> an H.264 .mp4 (faststart: the index before the data, as streamed files have)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), mode="w", options=options) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"g": "8"}  # a keyframe every 8 frames: seeking is exercised
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def truncate(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def moving_frames(count: int = 40, height: int = 48, width: int = 64) -> np.ndarray:
    """A textured background (so the video has real bytes to cut) and a bright square whose position
    identifies the frame."""
    texture = np.random.default_rng(0).integers(0, 120, (height, width, 3), dtype=np.uint8)
    frames = np.repeat(texture[None], count, axis=0)
    for i in range(count):
        x = int(i * (width - 12) / count)
        frames[i, 16:32, x : x + 12] = (230, 200, 60)
    return frames


def _jpeg(frame: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return data.tobytes()


def test_decode_jpeg_and_corrupt_bytes():
    frame = moving_frames(1)[0]
    data = _jpeg(frame)
    decoded = decode_jpeg(data)
    reference = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert decoded.shape == frame.shape and np.array_equal(decoded, reference)
    for bad in (data[: len(data) // 2], b"not a jpeg at all", b"", b"\xff\xd8" + b"\x00" * 100 + b"\xff\xd9"):
        with pytest.raises(CorruptFrameError):
            decode_jpeg(bad, "s3://bucket/frame.jpg")


def test_jpeg_folder_reads_only_requested_frames(tmp_path, monkeypatch):
    frames = moving_frames(6)
    uris = []
    for i, frame in enumerate(frames):
        (tmp_path / f"{i:05d}.jpg").write_bytes(_jpeg(frame))
        uris.append(str(tmp_path / f"{i:05d}.jpg"))
    store = LocalObjectStore()
    read = []
    original = store.read_bytes
    monkeypatch.setattr(store, "read_bytes", lambda uri: read.append(uri) or original(uri))
    source = JpegFolderSource(store, "v", uris, (48, 64))
    out = source.read([4, 1], size=560)
    assert read == [uris[4], uris[1]]
    expected = resize_frames(np.stack([decode_jpeg(Path(u).read_bytes()) for u in (uris[4], uris[1])]), 560)
    assert out.shape == (2, 560, 560, 3) and np.array_equal(out, expected)
    with pytest.raises(FrameSizeError):
        JpegFolderSource(store, "v", uris, (40, 64)).read([0])
    with pytest.raises(MissingFrameError):
        JpegFolderSource(store, "v", [str(tmp_path / "gone.jpg")], None).read([0])
    with pytest.raises(IndexError):
        source.read([6])


def _all_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_mp4_decodes_exactly_the_requested_frames(tmp_path, backend):
    path = tmp_path / "clip.mp4"
    write_mp4(path, moving_frames(40))
    reference = _all_frames(path)  # every frame, decoded in order
    assert len(reference) == 40
    source = Mp4Source(LocalObjectStore(), "clip", str(path), 40, (48, 64), backend=backend)
    indices = [39, 0, 3, 25, 26, 3]  # unordered, a repeat, a seek (gap > 16), neighbours
    out = source.read(indices)
    assert np.array_equal(out, reference[indices])
    assert np.array_equal(source.read([5], size=560)[0], resize_frames(reference[5], 560))


def test_truncated_and_corrupt_mp4(tmp_path):
    frames = moving_frames(40)
    cut = tmp_path / "cut.mp4"
    write_mp4(cut, frames)
    reference = _all_frames(cut)
    truncate(cut, 0.5)
    source = Mp4Source(LocalObjectStore(), "cut", str(cut), 40, (48, 64))
    assert np.array_equal(source.read([0, 2]), reference[[0, 2]])  # the start still decodes
    with pytest.raises(TruncatedVideoError):
        source.read([0, 39])
    index_last = tmp_path / "index_last.mp4"  # the default layout: a cut file loses its index (moov atom)
    write_mp4(index_last, frames, faststart=False)
    truncate(index_last, 0.5)
    with pytest.raises(CorruptVideoError):
        Mp4Source(LocalObjectStore(), "v", str(index_last), 40, (48, 64)).read([0])
    with pytest.raises(MissingFrameError):
        Mp4Source(LocalObjectStore(), "v", str(tmp_path / "gone.mp4"), 40, None).read([0])
    (tmp_path / "junk.mp4").write_bytes(io.BytesIO(b"\x00" * 500).read())
    with pytest.raises(CorruptVideoError):
        Mp4Source(LocalObjectStore(), "v", str(tmp_path / "junk.mp4"), 40, None, backend="decord").read([0])


def test_a_read_past_its_deadline_is_a_timeout_and_other_outcomes_pass_through():
    import threading

    from veason_ray.video_decoding import SampleTimeoutError, within_deadline

    release = threading.Event()
    with pytest.raises(SampleTimeoutError, match=r"video_7: not read in 0.05 s \(data.sample_timeout_s\)"):
        within_deadline(release.wait, 0.05, "video_7")  # a read that never returns on its own
    release.set()
    assert SampleTimeoutError.reason == "timeout"
    assert within_deadline(lambda: 42, 5.0, "x") == 42
    with pytest.raises(KeyError):
        within_deadline(lambda: {}["missing"], 5.0, "x")
