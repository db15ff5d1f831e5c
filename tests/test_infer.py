"""`veason infer` as a user runs it: one synthetic video as an .mp4 (the policy on a vLLM engine, answers
constrained to the format) and as a JPEG folder (Hugging Face generate), the tiny random policy, the colour
tracker; the masks, their RLE JSON and a playable overlay video are written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from veason_ray.datasets import decode_rle, open_dataset
from veason_ray.mask_io import read_mask_png
from veason_ray.models.tiny_qwen import write_tiny_qwen

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory) -> Path:
    return write_tiny_qwen(tmp_path_factory.mktemp("policy") / "qwen2_5_vl_tiny", seed=0)


def _write_mp4(path: Path, frames: np.ndarray) -> None:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=6)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _infer(tmp_path: Path, policy: Path, video: str, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "pipelines.cli", "infer", "tests/configs/small.yaml", f"input={video}",
        "query=the large purple shape", f"output={out}", f"model.policy={policy}", "reward.propagator=colour",
        "data.eval_num_frames=4", "inference.max_new_tokens=192", "inference.constrained_think_chars=16",
        "inference.constrained_max_boxes=2", *extra,
    ]  # fmt: skip
    env = {**os.environ, "TQDM_DISABLE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done, out


def _check_outputs(out: Path, frames: np.ndarray, names: list[str]) -> dict:
    answer = json.loads((out / "answer.json").read_text())
    assert answer["query"] == "the large purple shape" and answer["frame_indices"] == [0, 3, 7, 11]
    pngs = sorted((out / "masks").glob("*.png"))
    assert [p.stem for p in pngs] == names
    masks = np.stack([read_mask_png(p.read_bytes()) for p in pngs])
    assert masks.shape == frames.shape[:3]
    rle = json.loads((out / "masks_rle.json").read_text())
    assert [f["frame"] for f in rle["frames"]] == names and rle["query"] == "the large purple shape"
    decoded = np.stack([decode_rle(f["rle"]) for f in rle["frames"]])
    assert np.array_equal(decoded.astype(bool), masks)
    with av.open(str(out / "overlay.mp4")) as container:  # playable: every frame decodes back
        played = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(played) == len(frames) and played[0].shape[:2] == frames.shape[1:3]
    strip = (out / "frames.png").read_bytes()
    assert strip.startswith(b"\x89PNG")
    return answer


def test_infer_on_an_mp4_with_vllm_and_constrained_answers(tmp_path, tiny_policy, synthetic_revos):
    dataset = open_dataset("revos", str(synthetic_revos), "valid")
    video = dataset.video_names[0]
    frames = dataset.read_frames(video)
    _write_mp4(tmp_path / "clip.mp4", frames)
    done, out = _infer(tmp_path, tiny_policy, str(tmp_path / "clip.mp4"), "inference.generator=vllm",
                       "inference.constrain_answer=true")  # fmt: skip
    answer = _check_outputs(out, frames, [f"{i:05d}" for i in range(len(frames))])
    # constrained decoding: the random policy's answer parses, names a prompt timestamp and has boxes
    assert answer["parse_failure"] is None and answer["empty_reason"] is None
    assert answer["keyframe"] in answer["frame_indices"] and answer["boxes"]
    assert "keyframe" in done.stdout and "overlay" in done.stdout


def test_infer_on_a_jpeg_folder_with_hugging_face(tmp_path, tiny_policy, synthetic_revos):
    dataset = open_dataset("revos", str(synthetic_revos), "valid")
    video = dataset.video_names[1]
    info = dataset.video(video)
    folder = Path(info.frame_uris[0]).parent
    done, out = _infer(tmp_path, tiny_policy, str(folder), "inference.generator=hf")
    answer = _check_outputs(out, dataset.read_frames(video), list(info.frame_names))
    assert answer["answer"] and set(answer["seconds"]) >= {"read", "policy", "propagate"}
    if answer["empty_reason"]:  # the random policy seldom writes a parsable answer: the reason is printed
        assert f"no masks: {answer['empty_reason']}" in done.stdout


def test_infer_refuses_a_missing_input_naming_the_key(tmp_path, tiny_policy):
    command = [sys.executable, "-m", "pipelines.cli", "infer", "tests/configs/small.yaml", f"input={tmp_path}/none.mp4",
               "query=x", f"model.policy={tiny_policy}"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "infer.input" in done.stderr and "Traceback" not in done.stderr
