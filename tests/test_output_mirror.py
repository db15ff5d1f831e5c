"""OutputMirror: a local destination is written in place; an s3:// destination (moto on 127.0.0.1) gets every
new or changed file at each push and nothing twice, a resumed run pulls what it continues, stale staging is
dropped, excluded folders stay local."""

from __future__ import annotations

import os

from veason_ray.object_store import join_uri, store_for
from veason_ray.output_mirror import OutputMirror


def test_a_local_destination_is_the_folder_itself(tmp_path):
    mirror = OutputMirror(str(tmp_path / "run"))
    assert mirror.local == tmp_path / "run" and mirror.local.is_dir()
    (mirror.local / "metrics.jsonl").write_text("{}\n")
    assert mirror.push() == 0 and mirror.pull("metrics.jsonl") == []
    assert mirror.uri_of("metrics.jsonl") == str(tmp_path / "run" / "metrics.jsonl")


def test_s3_pushes_what_changed_and_a_resumed_run_pulls_it_back(s3_server, s3_bucket, tmp_path):
    uri = join_uri(s3_bucket, "runs/demo")
    store = store_for(uri, s3_server)
    mirror = OutputMirror(uri, s3_server, exclude=("wandb",), staging_root=tmp_path / "staging")
    assert mirror.local.is_relative_to(tmp_path / "staging")
    (mirror.local / "samples").mkdir()
    (mirror.local / "samples" / "step_1.png").write_bytes(b"png")
    (mirror.local / "metrics.jsonl").write_text('{"step": 1}\n')
    (mirror.local / "wandb").mkdir()
    (mirror.local / "wandb" / "run.log").write_text("local only")
    assert mirror.push() == 2
    assert store.read_bytes(join_uri(uri, "samples/step_1.png")) == b"png"
    assert not store.exists(join_uri(uri, "wandb/run.log"))
    assert mirror.push() == 0  # nothing changed
    with (mirror.local / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2}\n')
    assert mirror.push() == 1
    assert mirror.uri_of("metrics.jsonl") == join_uri(uri, "metrics.jsonl")

    # the next job (another node, or this one with stale staging): the bucket is the truth
    (mirror.local / "stale.txt").write_text("from an earlier staging")
    resumed = OutputMirror(uri, s3_server, staging_root=tmp_path / "staging")
    assert resumed.local == mirror.local and not (resumed.local / "stale.txt").exists()
    assert resumed.pull("metrics.jsonl", "wandb_run_id") == ["metrics.jsonl"]
    assert (resumed.local / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    assert resumed.push() == 0  # a pulled file is not uploaded back unchanged
    os.utime(resumed.local / "metrics.jsonl", ns=(1, 1))
    assert resumed.push() == 1
