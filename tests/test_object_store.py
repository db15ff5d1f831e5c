"""ObjectStore: local files and a real S3-compatible server (moto on 127.0.0.1)."""

from __future__ import annotations

import dataclasses
import pickle
import threading
import time
from pathlib import Path

import pytest

from veason_ray.config import StorageConfig
from veason_ray.object_store import (
    LocalObjectStore,
    S3ObjectStore,
    is_s3_uri,
    join_uri,
    store_for,
)


def test_join_and_scheme():
    assert join_uri("s3://b/p/", "a/", "/c.json") == "s3://b/p/a/c.json"
    assert (
        join_uri("/data", "JPEGImages", "OVIS/train/x", "00000.jpg")
        == "/data/JPEGImages/OVIS/train/x/00000.jpg"
    )
    assert join_uri("s3://b", "", "k") == "s3://b/k"
    assert is_s3_uri("s3://b/k") and not is_s3_uri("/tmp/s3://x") and not is_s3_uri("b/k")


def test_store_for_picks_by_scheme(s3_server):
    assert isinstance(store_for("/tmp/x"), LocalObjectStore)
    s3 = store_for("s3://b/k", s3_server)
    assert isinstance(s3, S3ObjectStore)
    assert store_for("s3://other/k", s3_server) is s3  # one filesystem per storage config


def _tree(store, root: str) -> dict[str, bytes]:
    files = {"a.txt": b"alpha", "sub/b.bin": bytes(range(256)) * 10, "sub/deeper/c": b""}
    for rel, data in files.items():
        store.write_bytes(join_uri(root, rel), data)
    return files


def _exercise(store, root: str, tmp_path: Path) -> None:
    files = _tree(store, root)
    assert store.read_bytes(join_uri(root, "a.txt")) == b"alpha"
    assert store.list_files(root) == sorted(join_uri(root, r) for r in files)
    assert store.list_files(join_uri(root, "sub")) == [
        join_uri(root, "sub/b.bin"),
        join_uri(root, "sub/deeper/c"),
    ]
    assert store.list_files(join_uri(root, "a.txt")) == [join_uri(root, "a.txt")]
    assert store.list_files(join_uri(root, "nothing-here")) == []
    assert store.exists(join_uri(root, "a.txt")) and store.exists(join_uri(root, "sub"))
    assert not store.exists(join_uri(root, "missing.txt"))
    assert store.file_size(join_uri(root, "sub/b.bin")) == 2560

    with store.open_input(join_uri(root, "sub/b.bin")) as f:
        f.seek(256 * 3 + 5)
        assert f.read(3) == bytes([5, 6, 7])
        f.seek(0)
        assert f.read(2) == b"\x00\x01"

    missing = join_uri(root, "missing.txt")
    for call in (store.read_bytes, store.open_input, store.file_size):
        with pytest.raises(FileNotFoundError, match="missing.txt"):
            call(missing)

    store.write_bytes(join_uri(root, "a.txt"), b"replaced")  # overwrite
    assert store.read_bytes(join_uri(root, "a.txt")) == b"replaced"

    local = tmp_path / "download"
    assert store.download_tree(root, local) == local
    assert (local / "a.txt").read_bytes() == b"replaced"
    assert (local / "sub" / "b.bin").read_bytes() == files["sub/b.bin"]
    assert (local / "sub" / "deeper" / "c").read_bytes() == b""

    # same size: skipped (kept as is); other size: fetched again
    (local / "a.txt").write_bytes(b"SAMESIZE")
    (local / "sub" / "b.bin").write_bytes(b"short")
    store.download_tree(root, local)
    assert (local / "a.txt").read_bytes() == b"SAMESIZE"
    assert (local / "sub" / "b.bin").read_bytes() == files["sub/b.bin"]
    assert not [p for p in local.rglob("*") if ".tmp-" in p.name]

    with pytest.raises(FileNotFoundError, match="nothing-here"):
        store.download_tree(join_uri(root, "nothing-here"), tmp_path / "empty")

    up = join_uri(root, "uploaded")
    assert store.upload_tree(local, up) == 3
    assert store.list_files(up) == sorted(join_uri(up, r) for r in files)
    assert store.read_bytes(join_uri(up, "sub/b.bin")) == files["sub/b.bin"]


def test_local_store(tmp_path):
    store = LocalObjectStore()
    _exercise(store, str(tmp_path / "root"), tmp_path)
    assert not [p for p in (tmp_path / "root").rglob("*") if ".tmp-" in p.name]  # writes were atomic renames
    assert store.download_tree(str(tmp_path / "root"), tmp_path / "root") == tmp_path / "root"


def test_s3_store(s3_server, s3_bucket, tmp_path):
    store = store_for(s3_bucket, s3_server)
    _exercise(store, join_uri(s3_bucket, "prefix"), tmp_path)
    # a pickled store (as shipped to a Ray worker) rebuilds its filesystem
    clone = pickle.loads(pickle.dumps(store))
    assert clone.read_bytes(join_uri(s3_bucket, "prefix/a.txt")) == b"replaced"


def test_s3_download_tree_of_a_checkpoint_layout(s3_server, s3_bucket, tmp_path):
    """The model loader's call: store_for(uri, storage).download_tree(uri, local_dir)."""
    ckpt = join_uri(s3_bucket, "runs/r1/step_10")
    big = bytes(range(256)) * (40 * 1024)  # 10 MiB: more than one read chunk
    store = store_for(ckpt, s3_server)
    store.write_bytes(join_uri(ckpt, "model.safetensors"), big)
    store.write_bytes(join_uri(ckpt, "config.json"), b"{}")
    local = store_for(ckpt, s3_server).download_tree(ckpt, tmp_path / "ckpt")
    assert (local / "model.safetensors").read_bytes() == big
    assert sorted(p.name for p in local.iterdir()) == ["config.json", "model.safetensors"]
    # a sibling prefix sharing the name's start is not part of the tree
    store.write_bytes(join_uri(s3_bucket, "runs/r1/step_100/x"), b"x")
    assert len(store.list_files(ckpt)) == 2


def test_s3_credentials_from_environment(s3_server, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_REGION", s3_server.region)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_access_key)
    store = S3ObjectStore(StorageConfig())
    store.write_bytes(join_uri(s3_bucket, "env.txt"), b"from env")
    assert store.read_bytes(join_uri(s3_bucket, "env.txt")) == b"from env"


def test_an_outage_is_waited_out_until_its_deadline_and_a_requests_own_error_fails_at_once(
    s3_server, s3_bucket
):
    """The store behind a proxy that stops listening and resets its connections (tests/tcp_proxy.py)."""
    from tcp_proxy import TCPProxy

    with TCPProxy(int(s3_server.endpoint_url.rsplit(":", 1)[1])) as proxy:
        storage = dataclasses.replace(
            s3_server, endpoint_url=f"http://127.0.0.1:{proxy.port}", outage_timeout_s=30.0
        )
        store, uri = S3ObjectStore(storage), join_uri(s3_bucket, "outage/a.bin")
        store.write_bytes(uri, b"before")
        proxy.cut()
        threading.Timer(3.0, proxy.restore).start()
        start = time.monotonic()
        store.write_bytes(uri, b"during")  # retried until the store is back
        assert time.monotonic() - start > 2.5
        assert store.read_bytes(uri) == b"during"
        assert store.list_files(join_uri(s3_bucket, "outage")) == [uri]

        proxy.cut()
        brief = S3ObjectStore(dataclasses.replace(storage, outage_timeout_s=2.0))
        start = time.monotonic()
        with pytest.raises(OSError, match=r"outage/a.bin: read failed.*storage.outage_timeout_s=2 s"):
            brief.read_bytes(uri)
        assert time.monotonic() - start < 10
        proxy.restore()
        start = time.monotonic()
        with pytest.raises(FileNotFoundError, match="outage/missing"):
            store.read_bytes(join_uri(s3_bucket, "outage/missing"))
        assert time.monotonic() - start < 5  # not retried


SECRET = "sEcReT-dO-nOt-LeAk-4f1c9"
KEY_ID = "AKIA-KEY-ID-DO-NOT-LEAK"


def test_errors_name_the_uri_and_hide_credentials(s3_server):
    closed_port = StorageConfig(
        endpoint_url="http://127.0.0.1:9",  # discard port: connection refused
        region="us-east-1",
        access_key_id=KEY_ID,
        secret_access_key=SECRET,
        session_token=SECRET + "-token",
        max_attempts=1,
        connect_timeout_s=1.0,
        request_timeout_s=1.0,
        outage_timeout_s=0.0,
    )
    no_bucket = StorageConfig(**{**vars(s3_server), "secret_access_key": SECRET, "access_key_id": KEY_ID})
    cases = [
        (closed_port, lambda s: s.read_bytes("s3://bucket/some/key.json"), "s3://bucket/some/key.json"),
        (closed_port, lambda s: s.list_files("s3://bucket/some"), "s3://bucket/some"),
        (no_bucket, lambda s: s.write_bytes("s3://no-such-bucket/k", b"x"), "s3://no-such-bucket/k"),
        (no_bucket, lambda s: s.read_bytes("s3://no-such-bucket/k"), "s3://no-such-bucket/k"),
    ]
    for storage, call, uri in cases:
        store = S3ObjectStore(storage)
        with pytest.raises(OSError) as info:
            call(store)
        text = f"{info.value} {info.value!r} {info.value.__cause__!r} {info.value.__context__!r}"
        assert uri in str(info.value)
        assert SECRET not in text and KEY_ID not in text
        assert SECRET not in repr(store) and KEY_ID not in repr(store)


def test_bad_endpoint_and_credentials_config():
    with pytest.raises(ValueError, match="endpoint_url"):
        S3ObjectStore(StorageConfig(endpoint_url="ftp://host:1")).read_bytes("s3://b/k")
    with pytest.raises(ValueError, match="together"):
        S3ObjectStore(StorageConfig(endpoint_url="http://h:1", access_key_id="only-id")).read_bytes(
            "s3://b/k"
        )
    with pytest.raises(ValueError, match="not an s3"):
        S3ObjectStore(StorageConfig(endpoint_url="http://h:1")).read_bytes("/local/path")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_checkpoints_are_pruned_to_the_newest_complete_ones(where, tmp_path, request):
    """`prune_checkpoints`: the newest `keep` complete checkpoints stay, older complete ones and a save cut short
    before the newest complete one go, and a save newer than it (maybe in progress) is left alone."""
    from veason_ray.training.checkpoint import (
        COMPLETE_MARKER,
        checkpoint_tag,
        latest_complete,
        prune_checkpoints,
    )

    storage = request.getfixturevalue("s3_server") if where == "s3" else None
    root = (
        f"{request.getfixturevalue('s3_bucket')}/run/checkpoints" if where == "s3" else str(tmp_path / "ckpt")
    )
    store = store_for(root, storage)
    for step, complete in ((10, True), (20, True), (25, False), (30, True), (40, True), (50, False)):
        tag = join_uri(root, checkpoint_tag(step))
        store.write_bytes(join_uri(tag, "model/weights.bin"), b"w" * 64)
        if complete:
            store.write_bytes(join_uri(tag, COMPLETE_MARKER), b"{}")
    removed = prune_checkpoints(root, keep=2, storage=storage)
    assert [uri.rsplit("/", 1)[-1] for uri in removed] == ["step_00000010", "step_00000020", "step_00000025"]
    left = {uri[len(root) + 1 :].split("/")[0] for uri in store.list_files(root)}
    assert left == {"step_00000030", "step_00000040", "step_00000050"}
    assert latest_complete(root, storage) == join_uri(root, "step_00000040")
    assert prune_checkpoints(root, keep=0, storage=storage) == []  # 0 keeps every complete one
    store.delete_tree(join_uri(root, "step_00000050"))
    store.delete_tree(join_uri(root, "step_00000099"))  # absent: nothing happens
    assert {uri[len(root) + 1 :].split("/")[0] for uri in store.list_files(root)} == {
        "step_00000030",
        "step_00000040",
    }
