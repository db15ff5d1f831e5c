"""Tiny models and the real loading code: `veason tiny-models` output loads through `load_policy` and
`load_sam2_video_predictor` from a local folder and from an s3:// copy (moto server), the policy answers a
multi-image prompt, and `SAM2MaskPropagator` equals sam2's own JPEG-folder path on the same pixels."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from veason_ray.config import StorageConfig
from veason_ray.cpu_torch_workarounds import apply_cpu_workarounds
from veason_ray.models import cli
from veason_ray.models.loading import load_policy, load_sam2_video_predictor, resolve_model_dir
from veason_ray.models.tiny_qwen import QWEN_SPECIAL_TOKENS, build_tiny_tokenizer, write_tiny_qwen
from veason_ray.object_store import store_for

ANSWERS = (
    '<think>The dog is clearest at 12s.</think>\n<answer>{"keyframe_timestamp": 12, '
    '"bbox_2d_list": [[104.5, 220.0, 318.25, 547.75], [0, 0, 559, 559]]}</answer>',
    '<think>Nothing matches.</think><answer>{"keyframe_timestamp": 0, "bbox_2d_list": []}</answer>',
    "Ünïcödé and 中文 still round-trip: byte-level BPE.",
)


@pytest.fixture(autouse=True)
def hub_offline(monkeypatch):
    """Nothing here may reach the Hugging Face hub (huggingface_hub reads the variable once, at import)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """Both tiny models, written by the `veason tiny-models` command code."""
    out = tmp_path_factory.mktemp("tiny")
    assert cli.run(argparse.Namespace(out=out, seed=0, sam2_image_size=256)) == 0
    return out


@pytest.fixture(scope="module")
def s3(tiny_dir):
    """A moto S3 server on 127.0.0.1 holding a copy of the tiny models under s3://models/tiny/."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    storage = StorageConfig(
        endpoint_url=f"http://{host}:{port}",
        region="us-east-1",
        access_key_id="test",
        secret_access_key="test",
    )
    boto3.client(
        "s3",
        endpoint_url=storage.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    ).create_bucket(Bucket="models")
    store_for("s3://models", storage).upload_tree(tiny_dir, "s3://models/tiny")
    yield storage
    server.stop()


@pytest.fixture(scope="module")
def policy(tiny_dir):
    return load_policy(str(tiny_dir / "qwen2_5_vl_tiny"), dtype=torch.float32)


@pytest.fixture(scope="module")
def sam2_predictor(tiny_dir):
    return load_sam2_video_predictor(str(tiny_dir / "sam2_tiny"))


def test_cpu_workarounds_make_torchvision_importable():
    first = apply_cpu_workarounds()
    assert apply_cpu_workarounds() == first  # idempotent
    import torchvision.transforms  # noqa: F401  (fails with "torchvision::nms does not exist" without it)

    assert first == (torch.version.cuda is None)


_SHM_SCRIPT = textwrap.dedent(
    """
    import deepspeed, torch, torch.distributed as dist
    from actors.network import free_port
    from veason_ray.cpu_torch_workarounds import skip_deepspeed_shm_build
    skip_deepspeed_shm_build()
    port = free_port()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, init_method=f"tcp://127.0.0.1:{port}",
                               rank=0, world_size=1, verbose=False)
    x = torch.ones(3)
    dist.all_reduce(x)
    print(x.tolist())
    """
)


@pytest.mark.skipif(torch.version.cuda is not None, reason="DeepSpeed builds the shm collective on CPU only")
def test_deepspeed_process_group_on_cpu_builds_no_extension(tmp_path):
    """DeepSpeed's CPU accelerator would compile its shared-memory collective (~40 s of C++) into
    TORCH_EXTENSIONS_DIR at `init_distributed`; skipped, nothing is built and collectives still work."""
    extensions = tmp_path / "torch_extensions"
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(extensions), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", _SHM_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[1.0, 1.0, 1.0]"
    assert "built successfully" not in result.stdout and not extensions.exists()


def test_tiny_qwen_is_deterministic_in_its_seed(tiny_dir, tmp_path):
    reference = tiny_dir / "qwen2_5_vl_tiny"
    same = write_tiny_qwen(tmp_path / "same", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert (same / name).read_bytes() == (reference / name).read_bytes(), name
    other = write_tiny_qwen(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (reference / "model.safetensors").read_bytes()


def test_tokenizer_round_trips_answers_and_keeps_special_tokens_whole(tiny_dir):
    tokenizer = build_tiny_tokenizer()
    config = json.loads((tiny_dir / "qwen2_5_vl_tiny" / "config.json").read_text())
    for answer in ANSWERS:
        assert tokenizer.decode(tokenizer(answer)["input_ids"]) == answer
    for token in QWEN_SPECIAL_TOKENS:
        assert len(tokenizer(token)["input_ids"]) == 1, token
    ids = tokenizer.convert_tokens_to_ids
    assert config["image_token_id"] == ids("<|image_pad|>")
    assert config["video_token_id"] == ids("<|video_pad|>")
    assert config["vision_start_token_id"] == ids("<|vision_start|>")
    assert config["text_config"]["eos_token_id"] == ids("<|im_end|>")
    assert config["text_config"]["vocab_size"] == len(tokenizer)
    # Qwen's pre-tokenizer splits numbers into single digits.
    assert tokenizer.tokenize("559") == ["5", "5", "9"]


def test_tokenizer_keeps_the_synthetic_worlds_words_whole():
    """As in Qwen's own vocabulary, a colour, shape or size word of the synthetic world is one token, so that a
    small policy ties "purple" to purple pixels without first assembling the word from byte pieces."""
    from veason_ray.synth.world import COLOURS, SHAPES, SIZES

    tokenizer = build_tiny_tokenizer()
    for word in (*COLOURS, *SHAPES, *SIZES, *(f"{shape}s" for shape in SHAPES)):
        pieces = tokenizer.tokenize(f" {word}")
        assert len(pieces) == 1, (word, pieces)
    assert len(tokenizer("the small purple triangle")["input_ids"]) == 4


def _frames(count: int, size: int = 560) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


def _multi_image_inputs(processor, frames):
    content = []
    for index, _ in enumerate(frames):
        content += [{"type": "text", "text": f"({index * 4}s)"}, {"type": "image"}]
    content.append({"type": "text", "text": "Find the dog that is about to jump."})
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    return text, processor(text=[text], images=[Image.fromarray(f) for f in frames], return_tensors="pt")


def test_policy_answers_a_multi_image_prompt(policy):
    model, processor = policy
    text, inputs = _multi_image_inputs(processor, _frames(3))
    assert text.startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n(0s)"
    )
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    # 560x560 -> 40x40 patches of 14 -> merged 2x2 -> 400 visual tokens per frame.
    assert inputs["image_grid_thw"].tolist() == [[1, 40, 40]] * 3
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 3 * 400
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    assert 1 <= len(new_tokens) <= 12
    assert isinstance(processor.decode(new_tokens, skip_special_tokens=True), str)


def test_load_policy_keeps_checkpoint_dtype_and_overrides_pixels(tiny_dir):
    model, processor = load_policy(str(tiny_dir / "qwen2_5_vl_tiny"), max_pixels=280 * 280)
    assert model.dtype == torch.bfloat16  # "auto": as stored
    inputs = processor.image_processor(images=[Image.fromarray(_frames(1)[0])], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 20, 20]]


def test_s3_copy_is_downloaded_once_and_loads(s3, tiny_dir, tmp_path):
    spec = "s3://models/tiny/qwen2_5_vl_tiny"
    local = resolve_model_dir(spec, s3, cache_dir=str(tmp_path))
    source = tiny_dir / "qwen2_5_vl_tiny"
    assert sorted(p.name for p in local.iterdir()) == sorted(p.name for p in source.iterdir())
    assert (local / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    # A second resolve uses the cached copy without listing the bucket again.
    unreachable = StorageConfig(endpoint_url="http://127.0.0.1:9", access_key_id="x", secret_access_key="x")
    assert resolve_model_dir(spec, unreachable, cache_dir=str(tmp_path)) == local
    model, processor = load_policy(spec, dtype=torch.float32, storage=s3, cache_dir=str(tmp_path))
    assert model.config.model_type == "qwen2_5_vl" and processor.tokenizer.eos_token == "<|im_end|>"


def test_processes_resolving_one_s3_copy_at_once_download_it_once(s3, tiny_dir, tmp_path, monkeypatch):
    """A node's learner rank and engines resolve the same s3:// policy at the same time: one copies it, the
    others wait on the cache entry's file lock and take that copy (threads here: each opens the lock file, and
    flock excludes separate opens as it does separate processes)."""
    import threading
    import time

    from veason_ray.models import loading

    copies = []
    real_fetch = loading._fetch

    def slow_fetch(*args):
        copies.append(args[0])
        time.sleep(0.5)  # the others arrive while the copy runs
        return real_fetch(*args)

    monkeypatch.setattr(loading, "_fetch", slow_fetch)
    spec, results = "s3://models/tiny/qwen2_5_vl_tiny", []
    threads = [
        threading.Thread(target=lambda: results.append(resolve_model_dir(spec, s3, cache_dir=str(tmp_path))))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert copies == [spec] and len(results) == 3 and len(set(results)) == 1
    source = tiny_dir / "qwen2_5_vl_tiny"
    assert (results[0] / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()


def test_a_local_spec_travels_as_an_absolute_path_and_a_remote_one_unchanged(tmp_path, monkeypatch):
    from veason_ray.models.loading import portable_model_spec

    (tmp_path / "policy").mkdir()
    monkeypatch.chdir(tmp_path)
    assert portable_model_spec("policy") == str(tmp_path / "policy")
    assert portable_model_spec("s3://bucket/policy") == "s3://bucket/policy"
    assert portable_model_spec("Qwen/Qwen2.5-VL-3B-Instruct") == "Qwen/Qwen2.5-VL-3B-Instruct"


def test_loading_errors_name_the_spec(tmp_path, s3):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_policy(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        resolve_model_dir(str(tmp_path / "missing" / "deeper" / "model"))
    with pytest.raises(OSError, match="'nobody/no-such-model'"):
        resolve_model_dir("nobody/no-such-model")  # HF_HUB_OFFLINE: not in the hub cache
    with pytest.raises(FileNotFoundError, match="s3://models/absent"):
        resolve_model_dir("s3://models/absent", s3, cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no .pt checkpoint"):
        load_sam2_video_predictor(str(tmp_path))
    with pytest.raises(ValueError, match="no config given"):
        (tmp_path / "lone.pt").write_bytes(b"")
        load_sam2_video_predictor(str(tmp_path / "lone.pt"))


def test_sam2_loads_from_file_with_packaged_config_and_from_s3(sam2_predictor, s3, tiny_dir, tmp_path):
    assert sam2_predictor.image_size == 256
    expected = sam2_predictor.state_dict()
    by_name = load_sam2_video_predictor(
        str(tiny_dir / "sam2_tiny" / "sam2_tiny.pt"), "configs/sam2.1/sam2.1_hiera_t.yaml", image_size=256
    )
    from_s3 = load_sam2_video_predictor("s3://models/tiny/sam2_tiny", storage=s3, cache_dir=str(tmp_path))
    for predictor in (by_name, from_s3):
        assert predictor.image_size == 256
        assert all(torch.equal(expected[k], v) for k, v in predictor.state_dict().items())


def _moving_disc_clip(num_frames: int = 5, height: int = 72, width: int = 96) -> np.ndarray:
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:height, :width]
    frames = rng.integers(0, 40, (num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        frames[t][(xx - (20 + 8 * t)) ** 2 + (yy - 36) ** 2 < 150] = (220, 60, 40)
    return frames


def _sam2_reference(predictor, jpeg_dir: Path, keyframe: int, boxes: np.ndarray, shape) -> np.ndarray:
    """sam2's public API on a JPEG folder: init_state, one object per box, propagate both ways, OR."""
    masks = np.zeros(shape, dtype=bool)
    if len(boxes) == 0:
        return masks
    state = predictor.init_state(video_path=str(jpeg_dir))
    for obj_id, box in enumerate(boxes, start=1):
        predictor.add_new_points_or_box(state, frame_idx=keyframe, obj_id=obj_id, box=box.tolist())
    for reverse in (False, True):
        for frame_idx, _, logits in predictor.propagate_in_video(
            state, start_frame_idx=keyframe, reverse=reverse
        ):
            masks[frame_idx] = (logits[:, 0] > 0).any(dim=0).numpy()
    return masks


def test_sam2_without_its_extension_skips_hole_filling_quietly(sam2_predictor):
    import warnings

    from veason_ray.models.loading import sam2_extension_available
    from veason_ray.models.sam2_group import SAM2GroupPropagator
    from veason_ray.models.sam2_propagator import SAM2MaskPropagator

    assert sam2_extension_available() or sam2_predictor.fill_hole_area == 0
    clip = _moving_disc_clip()
    box = np.array([[8, 20, 44, 52]], dtype=np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SAM2MaskPropagator(sam2_predictor).propagate(clip, 2, box)
        SAM2GroupPropagator(sam2_predictor).propagate(clip, 2, box)
    assert not [w for w in caught if "_C" in str(w.message) or "post-processing" in str(w.message)]


@pytest.mark.parametrize("threads", [1, 3])
def test_sam2_propagator_equals_sam2_on_a_jpeg_folder(sam2_predictor, tmp_path, threads):
    from sam2.utils.misc import load_video_frames_from_jpg_images

    from veason_ray.models.sam2_propagator import SAM2MaskPropagator, sam2_input_frames

    clip = _moving_disc_clip()
    for index, frame in enumerate(clip):
        Image.fromarray(frame).save(tmp_path / f"{index:05d}.jpg")
    # Both paths must see the same pixels, so the propagator gets the decoded JPEGs.
    frames = np.stack(
        [np.array(Image.open(tmp_path / f"{i:05d}.jpg").convert("RGB")) for i in range(len(clip))]
    )
    images, _, _ = load_video_frames_from_jpg_images(
        str(tmp_path), sam2_predictor.image_size, offload_video_to_cpu=True
    )
    assert torch.equal(sam2_input_frames(frames, sam2_predictor.image_size, threads), images)  # bit for bit
    boxes = np.array([[8, 20, 44, 52], [60, 10, 90, 40]], dtype=np.float32)
    propagator = SAM2MaskPropagator(sam2_predictor, preprocess_threads=threads)
    keyframe = 2
    for count in (0, 1, 2):
        masks = propagator.propagate(frames, keyframe, boxes[:count])
        assert masks.shape == frames.shape[:3] and masks.dtype == bool
        reference = _sam2_reference(sam2_predictor, tmp_path, keyframe, boxes[:count], masks.shape)
        np.testing.assert_array_equal(masks, reference)  # identical, no tolerance
        assert masks.any() == (count > 0)


def test_sam2_propagator_rejects_malformed_input(sam2_predictor):
    from veason_ray.models.sam2_propagator import SAM2MaskPropagator

    propagator = SAM2MaskPropagator(sam2_predictor)
    clip = _moving_disc_clip(num_frames=2)
    box = np.array([[0, 0, 10, 10]], dtype=np.float32)
    with pytest.raises(ValueError, match="keyframe_position 2"):
        propagator.propagate(clip, 2, box)
    with pytest.raises(ValueError, match="uint8"):
        propagator.propagate(clip.astype(np.float32), 0, box)
    with pytest.raises(ValueError, match=r"\(K, 4\)"):
        propagator.propagate(clip, 0, np.zeros((1, 3), dtype=np.float32))
    assert not propagator.propagate(clip, 1, np.zeros((0, 4), dtype=np.float32)).any()


_VLLM_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    model_dir = sys.argv[1]
    start = time.perf_counter()
    llm = LLM(model=model_dir, max_model_len=4096, limit_mm_per_prompt={"image": 2}, seed=0, enforce_eager=True)
    startup_s = time.perf_counter() - start
    processor = AutoProcessor.from_pretrained(model_dir)
    content = [{"type": "text", "text": "(0s)"}, {"type": "image"}, {"type": "text", "text": "(4s)"},
               {"type": "image"}, {"type": "text", "text": "Find the dog."}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                           add_generation_prompt=True)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (560, 560, 3), dtype=np.uint8)) for _ in range(2)]
    start = time.perf_counter()
    out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": images}},
                       SamplingParams(max_tokens=16, temperature=1.0, seed=0), use_tqdm=False)[0]
    print(json.dumps({"startup_s": startup_s, "generate_s": time.perf_counter() - start,
                      "prompt_tokens": len(out.prompt_token_ids), "new_tokens": len(out.outputs[0].token_ids)}))
    """
)


def _torch_entry_point_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a fresh process in which every `import torch` applies the CPU workarounds (vLLM
    inspects models in a subprocess of its own). Installed packages get this from veason-ray's
    "torch.backends" entry point; until that is installed, a stand-in distribution on PYTHONPATH declares it."""
    env = dict(os.environ)
    target = "veason_ray.cpu_torch_workarounds:apply_cpu_workarounds"
    if not any(ep.value == target for ep in entry_points(group="torch.backends")):
        dist = tmp_path / "entry_point" / "veason_cpu_workarounds-0.dist-info"
        dist.mkdir(parents=True)
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: veason-cpu-workarounds\nVersion: 0\n")
        (dist / "entry_points.txt").write_text(f"[torch.backends]\nveason_cpu_workarounds = {target}\n")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(dist.parent), env.get("PYTHONPATH")]))
    env.update(
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        VLLM_CPU_OMP_THREADS_BIND="nobind",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
    )
    return env


@pytest.mark.slow
def test_vllm_loads_tiny_qwen_and_answers_two_images(tiny_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", _VLLM_SCRIPT, str(tiny_dir / "qwen2_5_vl_tiny")],
        env=_torch_entry_point_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["prompt_tokens"] > 2 * 400 and report["new_tokens"] >= 1
    print("vLLM tiny Qwen2.5-VL:", report)
