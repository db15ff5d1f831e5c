"""`veason eval` (pipelines/evaluate.py) on the synthetic world in the ReVOS, MeViS and ReasonVOS layouts, on a
local Ray cluster: ground-truth answers through the whole job, the metrics' fixed points, a corrupt video, and a
run killed halfway then resumed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from veason_ray.config_loading import load_config
from veason_ray.datasets import open_dataset
from veason_ray.mask_io import read_mask_png, write_mask_pngs
from veason_ray.metrics import score_expression
from veason_ray.object_store import store_for

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {"revos": "valid", "mevis": "valid_u", "reasonvos": "valid"}
# ground-truth answers, the synthetic world's colour tracker, every expression of the split
GT_RUN = [
    "eval.answers=ground_truth", "reward.propagator=colour", "eval.max_expressions=0", "eval.worst_overlays=1",
    "eval.score_oracle=false", "data.eval_num_frames=4", "data.decode_concurrency=1", "placement.num_cpus=4",
]  # fmt: skip


def _root(layout, synthetic_revos, synthetic_mevis, synthetic_reasonvos) -> Path:
    return {"revos": synthetic_revos, "mevis": synthetic_mevis, "reasonvos": synthetic_reasonvos}[layout]


def _config(layout: str, root: Path, out: Path, *extra: str):
    return load_config(
        "tests/configs/small.yaml",
        [
            f"data.dataset={layout}",
            f"data.root={root}",
            f"eval.split={LAYOUTS[layout]}",
            f"eval.output_dir={out}",
        ]
        + GT_RUN
        + list(extra),
    )


@pytest.mark.parametrize(
    "layout",
    # MeViS and ReasonVOS through the whole job are slow-marked (the default suite is at its 20-minute budget);
    # their readers are tested in test_datasets.py, and the ReVOS layout runs here and in test_demo.py
    [
        layout if layout == "revos" else pytest.param(layout, marks=pytest.mark.slow)
        for layout in sorted(LAYOUTS)
    ],
)
def test_ground_truth_answers_and_masks(
    layout, local_ray, tmp_path, synthetic_revos, synthetic_mevis, synthetic_reasonvos
):
    from pipelines.evaluate import run_evaluation

    root = _root(layout, synthetic_revos, synthetic_mevis, synthetic_reasonvos)
    report = run_evaluation(_config(layout, root, tmp_path / "eval"))
    summary = report.summary
    dataset = open_dataset(layout, str(root), LAYOUTS[layout])
    assert summary["expressions"] == len(dataset) and summary["failed"] == 0
    assert summary["benchmark"] == layout and summary["split"] == LAYOUTS[layout]
    main = "overall" if layout == "revos" else "all"
    assert list(summary["subsets"]) == (
        ["referring", "reasoning", "overall"] if layout == "revos" else ["all"]
    )
    assert summary["subsets"][main]["jf"] >= 0.90, summary["subsets"]
    assert summary["parse_rate"] == 1.0
    lines = (tmp_path / "eval" / "results.jsonl").read_text().splitlines()
    assert len(lines) == len(dataset)
    assert (tmp_path / "eval" / "summary.md").read_text().startswith(f"# {layout} {LAYOUTS[layout]}")
    assert len(summary["worst_overlays"]) == 1
    stills = sorted((tmp_path / "eval" / "overlays").glob("worst_*.png"))  # each overlay video has its still
    assert len(stills) == 1 and stills[0].with_suffix(".mp4").is_file()

    # the masks written in the public tools' layout, read back: ground truth as predictions scores exactly 1
    for record in dataset.expressions():
        info = dataset.video(record.video)
        folder = tmp_path / "eval" / "masks" / record.video / record.exp_id
        assert sorted(p.stem for p in folder.glob("*.png")) == sorted(info.frame_names)
        gt = dataset.gt_masks(record)
        gt_folder = tmp_path / "gt" / record.video / record.exp_id
        write_mask_pngs(store_for(str(gt_folder)), str(gt_folder), gt, info.frame_names)
        read_back = np.stack([read_mask_png((gt_folder / f"{n}.png").read_bytes()) for n in info.frame_names])
        perfect = score_expression(read_back, gt, record.type_id, dataset.foreground(record.video))
        assert perfect.j == 1.0 and perfect.f == 1.0 and perfect.r_corrected == 1.0
        # an all-empty prediction: J = F = the share of frames where the target is absent (docs/method.md sec. 7)
        empty = score_expression(np.zeros_like(gt), gt, record.type_id)
        absent = float(np.mean(~gt.reshape(len(gt), -1).any(axis=1)))
        assert empty.j == pytest.approx(absent) and empty.f == pytest.approx(absent)


def test_a_corrupt_video_is_recorded_and_the_run_completes(local_ray, tmp_path, synthetic_revos):
    from pipelines.evaluate import run_evaluation

    root = tmp_path / "revos"
    shutil.copytree(synthetic_revos, root)
    dataset = open_dataset("revos", str(root), "valid")
    broken = dataset.video_names[0]
    frame = Path(dataset.video(broken).frame_uris[5])
    frame.write_bytes(frame.read_bytes()[:200])  # a truncated JPEG in the middle of the video
    report = run_evaluation(_config("revos", root, tmp_path / "eval"))
    failed = [r for r in report.results if r.error]
    assert {r.video for r in failed} == {broken} and len(failed) == len(dataset.expressions_of(broken))
    assert all(r.error.startswith("corrupt_frame") for r in failed)
    assert report.summary["failed"] == len(failed) and report.summary["failures"] == {
        "corrupt_frame": len(failed)
    }
    assert report.summary["expressions"] == len(dataset) - len(failed)
    assert report.summary["subsets"]["overall"]["jf"] >= 0.9
    assert "Not evaluated" in (tmp_path / "eval" / "summary.md").read_text()


@pytest.mark.slow  # ~25 s: the whole job once more; within_deadline itself is tested in test_video_decoding.py
def test_reads_past_their_deadline_are_recorded_as_timeouts_and_the_run_completes(
    local_ray, tmp_path, synthetic_revos
):
    from pipelines.evaluate import run_evaluation

    report = run_evaluation(
        _config("revos", synthetic_revos, tmp_path / "eval", "data.sample_timeout_s=0.000001")
    )
    assert report.results and all(r.error and r.error.startswith("timeout: ") for r in report.results)
    assert (
        report.summary["failures"] == {"timeout": len(report.results)} and report.summary["expressions"] == 0
    )
    assert "nan" not in (tmp_path / "eval" / "summary.md").read_text().lower()


@pytest.mark.slow  # ~70 s: two runs of the job in their own processes, one killed (make test-slow)
def test_a_run_killed_halfway_resumes_to_the_same_summary(local_ray, tmp_path, synthetic_revos):
    from pipelines.evaluate import run_evaluation

    base = [
        sys.executable, "-m", "pipelines.cli", "eval", "tests/configs/small.yaml", f"data.root={synthetic_revos}",
        "eval.split=train", "data.decode_concurrency=1", *GT_RUN,
    ]  # fmt: skip
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TQDM_DISABLE": "1"}
    # the uninterrupted run, in this process, with the same configuration as the command line's
    expected = run_evaluation(
        load_config("tests/configs/small.yaml", [*base[5:], f"eval.output_dir={tmp_path / 'whole'}"])
    ).summary
    total = expected["expressions"]

    cut = tmp_path / "cut"
    process = subprocess.Popen(
        base + [f"eval.output_dir={cut}"], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    results = cut / "results.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if results.exists() and 0 < len(results.read_text().splitlines()) < total:
            os.killpg(process.pid, signal.SIGKILL)  # the driver and its local Ray, mid-run
            break
        time.sleep(0.2)
    process.wait(timeout=60)
    partial = len(results.read_text().splitlines())
    assert 0 < partial < total, f"the run was not caught halfway ({partial} of {total} written)"

    resumed = subprocess.run(
        base + [f"eval.output_dir={cut}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"evaluating {total - partial} expressions" in resumed.stdout
    got = json.loads((cut / "summary.json").read_text())
    for key in ("expressions", "failed", "subsets", "extra_subsets", "rewards", "parse_rate"):
        assert got[key] == expected[key], key
    assert len((cut / "results.jsonl").read_text().splitlines()) == total


def test_a_split_in_object_storage(local_ray, tmp_path, synthetic_revos, s3_server, s3_bucket):
    """The same job on the dataset read from an S3-compatible server (moto on 127.0.0.1) by every stage."""
    from pipelines.evaluate import run_evaluation

    remote = f"{s3_bucket}/revos"
    store_for(remote, s3_server).upload_tree(synthetic_revos, remote)
    cfg = _config("revos", synthetic_revos, tmp_path / "eval")
    cfg.data.root, cfg.storage = remote, s3_server
    report = run_evaluation(cfg)
    local = open_dataset("revos", str(synthetic_revos), "valid")
    assert report.summary["expressions"] == len(local) and report.summary["failed"] == 0
    assert report.summary["subsets"]["overall"]["jf"] >= 0.9
    record = next(local.expressions())
    assert len(list((tmp_path / "eval" / "masks" / record.video / record.exp_id).glob("*.png"))) == len(
        local.video(record.video).frame_names
    )


def test_a_stalled_wait_is_interrupted_at_its_deadline():
    import signal

    from pipelines.evaluate import StallWatch

    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as vLLM's engine-core entry point leaves it
    watch = StallWatch(timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        while time.monotonic() - started < 10:  # a wait that never sees a result
            time.sleep(0.05)
    assert watch.fired and time.monotonic() - started < 6


def test_an_engine_error_is_recorded_per_expression(local_ray, tmp_path, synthetic_revos):
    """Prompts longer than the engine's context (a request error, the engine lives): every expression is
    recorded with the engine's reason, and the job finishes."""
    from pipelines.evaluate import run_evaluation
    from veason_ray.models.tiny_qwen import write_tiny_qwen

    policy = write_tiny_qwen(tmp_path / "qwen2_5_vl_tiny", seed=0)
    cfg = _config("revos", synthetic_revos, tmp_path / "eval", "eval.answers=policy", f"model.policy={policy}",
                  "rollout.max_model_len=64", "inference.max_new_tokens=8", "eval.worst_overlays=0")  # fmt: skip
    report = run_evaluation(cfg)
    dataset = open_dataset("revos", str(synthetic_revos), "valid")
    assert len(report.results) == len(dataset) and report.summary["failed"] == len(dataset)
    assert all(r.error.startswith("engine_error: ") for r in report.results)
    assert report.summary["failures"] == {"engine_error": len(dataset)}
