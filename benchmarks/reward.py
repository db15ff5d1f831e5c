"""The SAM2 reward of one GRPO step: our pool against the release's way, in one run, same GPU, same weights.

Step: `--groups` groups x `--answers` answers, `--frames` sampled frames at 560x560 each (synthetic moving
discs, `tests/reward_scenes.py`, every answer valid and distinct: no reuse of repeated answers).
SAM2: random-init weights of `--config` (hiera-large by default), written once to a checkpoint file that the
baseline and every reward actor load.

- release: one answer after another, each a full `score_response` with sam2's own `init_state` on a JPEG
  folder of the group's frames (decode + resize on the CPU, one image-encoder pass per frame), a box per
  object, propagate forward and backward (bf16 autocast), as the release computes its rewards.
- in-process: `score_groups` on the whole step in this process (no Ray): the shared, batched computation.
- pool AxF: `SAM2RewardPool` with A actors on F GPU each, `score` of the whole step (frames in Ray's object
  store, as the GRPO driver sends them).
Equality: on the first `--check-groups` groups, masks of `SAM2GroupPropagator` against the plain in-memory
per-answer `SAM2MaskPropagator` (same pixels), and the pool's rewards against `score_response` with it.

    python benchmarks/reward.py [--groups 16 --answers 8 --frames 6 --steps 3 --pools 1x1.0,2x0.5]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from veason_ray.cpu_torch_workarounds import apply_cpu_workarounds

apply_cpu_workarounds()

import torch  # noqa: E402

from veason_ray.config import RewardConfig, SAM2Config  # noqa: E402
from veason_ray.mask_propagation import MaskPropagator  # noqa: E402
from veason_ray.models.group_scoring import GroupInput, score_groups  # noqa: E402
from veason_ray.models.loading import load_sam2_video_predictor  # noqa: E402
from veason_ray.models.sam2_group import PropagationRequest, SAM2GroupPropagator  # noqa: E402
from veason_ray.models.sam2_propagator import SAM2MaskPropagator, track_boxes  # noqa: E402
from veason_ray.reward_scoring import score_sample  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the synthetic reward scenes
from reward_scenes import max_reward_difference, synthetic_group  # noqa: E402


class ReleasePropagator(MaskPropagator):
    """The release's way: sam2's `init_state` on a JPEG folder for every answer, then boxes and propagation."""

    def __init__(self, predictor, jpeg_dir: Path):
        self.predictor, self.jpeg_dir = predictor, jpeg_dir

    def propagate(self, frames, keyframe_position, boxes):
        masks = np.zeros(frames.shape[:3], dtype=bool)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            state = self.predictor.init_state(video_path=str(self.jpeg_dir))
            track_boxes(self.predictor, state, keyframe_position, boxes, masks)
        return masks


class RecordingPropagator(MaskPropagator):
    """Keeps the propagation requests of `score_response` (for the mask equality check)."""

    def __init__(self):
        self.requests = []

    def propagate(self, frames, keyframe_position, boxes):
        self.requests.append((int(keyframe_position), np.array(boxes, np.float32)))
        return np.zeros(frames.shape[:3], dtype=bool)


def _score(group, rollout, frames, propagator):
    return score_sample(rollout.text, group.sample, frames=frames, propagator=propagator)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def write_random_checkpoint(config: str, out: Path, seed: int, image_size: int) -> Path:
    from sam2.build_sam import build_sam2

    torch.manual_seed(seed)
    overrides = [f"++model.image_size={image_size}"] if image_size else []
    model = build_sam2(config, ckpt_path=None, device="cpu", hydra_overrides_extra=overrides)
    path = out / "sam2_random.pt"
    torch.save({"model": model.state_dict()}, path)
    return path


def release_step(predictor, steps_data, jpeg_dirs) -> tuple[float, list]:
    rewards = []

    def run():
        for (group, rollouts), jpeg_dir in zip(steps_data, jpeg_dirs, strict=True):
            propagator = ReleasePropagator(predictor, jpeg_dir)
            rewards.append([_score(group, r, group.sample.frames, propagator) for r in rollouts])

    return _timed(run), rewards


def check_masks(predictor, data) -> dict:
    """Group propagator vs plain per-answer propagator on the same in-memory pixels."""
    plain = SAM2MaskPropagator(predictor)
    videos, requests = {}, []
    for index, (group, rollouts) in enumerate(data):
        videos[index] = group.sample.frames
        for rollout in rollouts:
            recorder = RecordingPropagator()
            _score(group, rollout, group.sample.frames, recorder)
            requests += [PropagationRequest(index, k, b) for k, b in recorder.requests]
    ours = SAM2GroupPropagator(predictor).propagate_many(videos, requests)
    reference = [plain.propagate(videos[r.video], r.keyframe_position, r.boxes) for r in requests]
    differing = sum(int((a != b).sum()) for a, b in zip(ours, reference, strict=True))
    total = sum(a.size for a in ours)
    identical = sum(bool((a == b).all()) for a, b in zip(ours, reference, strict=True))
    ious = [
        float((a & b).sum() / max((a | b).sum(), 1)) if (a | b).any() else 1.0
        for a, b in zip(ours, reference, strict=True)
    ]
    return {
        "requests": len(requests),
        "identical_requests": identical,
        "differing_pixels": differing,
        "pixel_fraction": differing / max(total, 1),
        "min_iou": min(ious),
        "foreground_fraction": float(np.mean([m.mean() for m in reference])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/sam2/sam2_hiera_l.yaml")
    parser.add_argument("--image-size", type=int, default=0, help="SAM2 input size (0 = the config's 1024)")
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--answers", type=int, default=8)
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--pools", default="1x1.0,2x0.5", help="comma-separated ACTORSxGPU_FRACTION")
    parser.add_argument("--check-groups", type=int, default=2)
    parser.add_argument(
        "--release-groups", type=int, default=0, help="time the release on this many groups (0=all)"
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)  # sam2's hole filling without its CUDA op
    os.environ.setdefault("TQDM_DISABLE", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    work = Path(tempfile.mkdtemp(prefix="reward_bench_"))

    data = [
        synthetic_group(
            i,
            seed=100 + i,
            num_frames=args.frames,
            num_objects=1 + (i % 4 == 0),
            answers=args.answers,
            edge_cases=False,
        )
        for i in range(args.groups)
    ]
    samples = args.groups * args.answers
    sample_frames = samples * args.frames
    jpeg_dirs = []
    for index, (group, _) in enumerate(data):
        folder = work / f"jpeg{index}"
        folder.mkdir()
        for t, frame in enumerate(group.sample.frames):
            Image.fromarray(frame).save(folder / f"{t:05d}.jpg", quality=95)
        jpeg_dirs.append(folder)

    checkpoint = write_random_checkpoint(args.config, work, seed=0, image_size=args.image_size)
    predictor = load_sam2_video_predictor(
        str(checkpoint), args.config, image_size=args.image_size or None, device=device
    )
    rows, results = [], {"gpu": gpu, "torch": torch.__version__, "args": vars(args)}

    # release: warm up on one answer, then one full step (or a subset, scaled to a step)
    release_data = data[: args.release_groups or args.groups]
    release_step(predictor, [(data[0][0], data[0][1][:2])], jpeg_dirs[:1])
    release_s, release_rewards = release_step(predictor, release_data, jpeg_dirs)
    release_s *= samples / sum(len(r) for _, r in release_data)
    rows.append(("release (serial, init_state per answer)", release_s))
    print(rows[-1], flush=True)

    # in-process shared computation
    propagator = SAM2GroupPropagator(predictor)
    items = [GroupInput(g, r, g.sample.frames) for g, r in data]
    score_groups(items, propagator)
    times = [_timed(lambda: score_groups(items, propagator)) for _ in range(args.steps)]
    rows.append(("ours in-process (score_groups, no Ray)", statistics.median(times)))
    print(rows[-1], times, flush=True)
    results["stats"] = dataclasses.asdict(propagator.last_stats)
    results["check"] = check_masks(predictor, data[: args.check_groups])

    import ray

    from actors.reward import SAM2RewardPool

    ray.init(num_gpus=1 if device == "cuda" else 0, include_dashboard=False, log_to_driver=False)
    refs = [ray.put(g.sample.frames) for g, _ in data]
    sent = [
        dataclasses.replace(g, sample=dataclasses.replace(g.sample, frames=ref))
        for (g, _), ref in zip(data, refs, strict=True)
    ]
    rollouts = [r for _, r in data]
    reference = None
    for spec in [s for s in args.pools.split(",") if s]:
        actors, fraction = spec.split("x")
        cfg = RewardConfig(
            sam2=SAM2Config(checkpoint=str(checkpoint), config=args.config, image_size=args.image_size),
            actors=int(actors),
            gpus_per_actor=float(fraction) if device == "cuda" else 0.0,
            cpus_per_actor=1.0,
            max_groups_per_batch=args.groups,
        )
        pool = SAM2RewardPool(cfg)
        pool.score(sent, rollouts)
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            scored = pool.score(sent, rollouts)
            times.append(time.perf_counter() - start)
        pool.shutdown()
        rows.append((f"ours: pool {actors} actor(s) x {float(fraction):g} GPU", statistics.median(times)))
        print(rows[-1], times, flush=True)
        if reference is None:  # pool rewards vs the plain per-answer reward on the checked groups
            plain = SAM2MaskPropagator(predictor)
            reference = max(
                max_reward_difference(
                    [s.reward for s in scored[i]], [_score(g, r, g.sample.frames, plain) for r in rs]
                )
                for i, (g, rs) in enumerate(data[: args.check_groups])
            )
            results["pool_vs_plain_max_reward_difference"] = reference
    results["release_vs_pool_consistency_mean"] = [
        float(np.mean([r.parts["consistency"] for g in release_rewards for r in g])),
        float(np.mean([s.reward.parts["consistency"] for g in scored for s in g])),
    ]

    header = f"{'method':46} {'s/step':>8} {'samples/s':>10} {'frames/s':>9} {'speed-up':>9}"
    lines = [
        f"SAM2 reward, {gpu}, {args.config}, {args.groups} groups x {args.answers} answers x {args.frames} frames @560",
        header,
    ]
    for name, seconds in rows:
        lines.append(
            f"{name:46} {seconds:8.2f} {samples / seconds:10.1f} {sample_frames / seconds:9.0f} {release_s / seconds:8.1f}x"
        )
    check = results["check"]
    lines.append(
        f"mask check on {check['requests']} answers: {check['identical_requests']} identical, "
        f"{check['differing_pixels']} differing pixels ({check['pixel_fraction']:.2e}), min IoU {check['min_iou']:.4f}; "
        f"pool vs per-answer reward max |diff| {results['pool_vs_plain_max_reward_difference']:.2e}"
    )
    lines.append(f"shared pass: {results['stats']}")
    results["rows"] = rows
    print("\n".join(lines))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "reward_benchmark.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
