"""benchmarks/peer_verl_probe.py: the stack sampler verl's workers run in the side-by-side benchmark, and its reader.

The sampler runs here in this process, as it does in a verl worker: a thread that looks at the other threads'
stacks while the main thread runs "verl" code (a module under a folder named verl, as verl's are). The process
title Ray sets per task is stood in for by a list the test changes between two tasks."""

import importlib.util
import json
import time

import pytest

from benchmarks import peer_verl_probe as probe

TASKS = (
    "ray::WorkerDict.actor_rollout_ref_compute_log_prob",
    "ray::WorkerDict.actor_rollout_ref_update_actor",
)


@pytest.fixture
def verl_module(tmp_path):
    """A module at <tmp>/site/verl/workers/busy.py whose `spin` keeps the CPU busy."""
    path = tmp_path / "site" / "verl" / "workers" / "busy.py"
    path.parent.mkdir(parents=True)
    path.write_text(
        "import time\n\ndef spin(seconds):\n    end = time.perf_counter() + seconds\n"
        "    while time.perf_counter() < end:\n        sum(range(100))\n"
    )
    spec = importlib.util.spec_from_file_location("busy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sampler_records_tasks_memory_and_where_time_went(tmp_path, monkeypatch, verl_module):
    title = [TASKS[0]]
    monkeypatch.setattr(probe, "task_title", lambda: title[0])
    sampler = probe.start(tmp_path / "probe", interval_s=0.01)
    began = time.time()
    verl_module.spin(0.6)
    title[0] = TASKS[1]
    verl_module.spin(0.6)
    sampler.stop()

    record = json.loads((tmp_path / "probe" / f"{sampler.path.stem}.json").read_text())
    spans = probe.task_spans(record)
    assert [s["title"] for s in spans] == list(TASKS)
    assert 0.4 < spans[0]["end"] - spans[0]["start"] < 1.0  # the first task ends where the second begins
    assert spans[0]["rss"] > 0.01  # this process's resident memory, in GiB
    for task in TASKS:
        counts = record["profile"][task]
        samples = counts.pop("(samples)")
        assert samples >= 20
        # the main thread; other busy threads of this process (earlier tests' servers, say) count beside it
        assert counts["workers/busy.py:spin < - < busy.py:spin"] >= 0.8 * samples

    lines = probe.summary_lines(probe.read_probes(tmp_path / "probe"), since=began, min_span_s=0.04, top=100)
    text = "\n".join(lines)
    assert "WorkerDict.actor_rollout_ref_compute_log_prob:" in text
    assert "where WorkerDict.actor_rollout_ref_compute_log_prob's" in text
    assert "workers/busy.py:spin < - < busy.py:spin" in text


def test_waiting_threads_are_not_counted(tmp_path, monkeypatch):
    """The main thread asleep in threading's wait (as a Ray worker between tasks) adds samples, no places."""
    monkeypatch.setattr(probe, "task_title", lambda: "ray::WorkerDict")
    import threading

    sampler = probe.start(tmp_path, interval_s=0.01)
    threading.Event().wait(0.3)
    sampler.stop()
    counts = json.loads(sampler.path.read_text())["profile"]["ray::WorkerDict"]
    assert counts.pop("(samples)") >= 10
    assert not [key for key in counts if "threading.py" in key]


def test_reader_skips_idle_and_short_tasks_and_unreadable_files(tmp_path):
    timeline = [
        [100.0, "ray::IDLE", 1.0, 0.0],
        [150.0, "ray::WorkerDict.actor_rollout_ref_compute_ref_log_prob", 40.0, 9.0],
        [160.0, "ray::WorkerDict.actor_rollout_ref_compute_ref_log_prob", 60.0, 12.0],
        [200.0, "ray::WorkerDict", 55.0, 9.0],
        [200.5, "ray::WorkerDict.actor_rollout_ref_update_actor", 55.0, 9.0],
        [201.0, "ray::WorkerDict", 56.0, 9.0],
    ]
    profile = {"ray::WorkerDict.actor_rollout_ref_compute_ref_log_prob": {"(samples)": 50, "a < b": 40}}
    (tmp_path / "7.json").write_text(json.dumps({"pid": 7, "timeline": timeline, "profile": profile}))
    (tmp_path / "8.json").write_text("{half a file")
    lines = probe.summary_lines(probe.read_probes(tmp_path), since=100.0, min_span_s=2.0, top=3)
    assert lines[0] == "process 7"
    assert (
        "50.0 -   100.0 s  WorkerDict.actor_rollout_ref_compute_ref_log_prob: 50.0 s, RSS up to 60.0"
        in lines[1]
    )
    assert not any("update_actor" in line or "IDLE" in line for line in lines)  # 0.5 s; idle
    assert lines[-1].strip() == "80%  a < b"
