"""`veason infer CONFIG input=VIDEO query="..." [key=value ...]`: segment one new video with a trained policy.

VIDEO is an .mp4 (or any file FFmpeg reads), a folder of JPEG/PNG frames, or an s3:// path to either
(`infer.input`; `query=` is `infer.query`, `output=` is `infer.output_dir`). The policy (`model.policy`, on a
vLLM engine or with Hugging Face `generate`: `inference.generator`) sees the evenly spaced frames, answers with
a keyframe and boxes, and the mask propagator (`reward.propagator`, SAM2 by default) segments every frame at the
video's resolution. Writes into `infer.output_dir` (default `<run.output_dir>/infer/<input name>`):

    answer.json      the query, the answer text, its reasoning, keyframe, boxes, why masks are empty if they are,
                     the seconds of each stage
    masks/           one PNG per frame (0 / 255, named after the input's frames)
    masks_rle.json   the same masks as COCO RLE, one per frame
    overlay.mp4      every frame with its mask, the keyframe's boxes and the query (H.264)
    frames.png       the frames the policy saw, with their timestamps, the keyframe and its boxes
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pipelines import preflight
from pipelines.config_command import add_config_arguments, config_from_args
from pipelines.console import open_console, say
from veason_ray.config import VeasonConfig
from veason_ray.inference import VideoSegmentation

SHORTHANDS = {"input": "infer.input", "query": "infer.query", "output": "infer.output_dir"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def expand_shorthands(args: argparse.Namespace) -> None:
    """`input=`, `query=` and `output=` stand for their `infer.*` keys (in the CONFIG position too)."""

    def expand(item: str) -> str:
        key, sep, value = item.partition("=")
        return f"{SHORTHANDS[key]}={value}" if sep and key in SHORTHANDS else item

    args.overrides = [expand(o) for o in args.overrides]
    if args.config is not None:
        args.config = expand(args.config)


def output_folder(cfg: VeasonConfig) -> Path:
    if cfg.infer.output_dir:
        return Path(cfg.infer.output_dir)
    name = cfg.infer.input.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0] or "video"
    return Path(cfg.run.output_dir) / "infer" / name


def write_outputs(
    folder: Path, result: VideoSegmentation, frames, frame_names, policy_frames, fps: float
) -> dict[str, Path]:
    """Every output file of one segmented video; their paths by name."""
    from veason_ray.mask_io import rle_document, write_mask_pngs
    from veason_ray.object_store import store_for
    from veason_ray.visualize import sampled_frames_strip, save_png, write_overlay_video

    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "answer": folder / "answer.json",
        "masks": folder / "masks",
        "rle": folder / "masks_rle.json",
        "overlay": folder / "overlay.mp4",
        "frames": folder / "frames.png",
    }
    paths["answer"].write_text(json.dumps(result.as_json(), indent=2))
    write_mask_pngs(store_for(str(paths["masks"])), str(paths["masks"]), result.masks, frame_names)
    paths["rle"].write_text(json.dumps(rle_document(result.masks, frame_names, {"query": result.query})))
    write_overlay_video(
        paths["overlay"],
        frames,
        result.masks,
        keyframe=result.keyframe,
        boxes=result.boxes,
        caption=result.query,
        fps=fps,
    )
    strip = sampled_frames_strip(
        policy_frames, result.frame_indices, result.keyframe, result.boxes_560, caption=result.query
    )
    save_png(strip, paths["frames"])
    return paths


def run(args: argparse.Namespace) -> int:
    import torch

    from actors.answer_generators import build_answer_generator
    from veason_ray.inference import VideoSegmenter, check_answer_budget, policy_view
    from veason_ray.models.propagator_choice import mask_propagator_for
    from veason_ray.object_store import store_for
    from veason_ray.video_decoding import BadDataError, VideoTooLongError, read_whole_video

    expand_shorthands(args)
    cfg = config_from_args(args, "infer")
    open_console(cfg, "infer")
    if not cfg.infer.input:
        raise SystemExit("veason infer: no video: pass input=PATH (an .mp4, a folder of JPEGs, or s3://...)")
    if not cfg.infer.query.strip():
        raise SystemExit('veason infer: no query: pass query="what to segment" (infer.query)')
    video = preflight.input_problems("infer.input", cfg.infer.input, cfg.storage)
    policy = preflight.model_problems("model.policy", cfg.model.policy, cfg.storage)
    preflight.check("infer", [*video, *policy, *preflight.sam2_problems(cfg)])
    started = time.perf_counter()
    try:
        video = read_whole_video(
            store_for(cfg.infer.input, cfg.storage), cfg.infer.input, cfg.inference.max_video_frames
        )
    except VideoTooLongError as error:
        raise SystemExit(f"veason infer: {error} (inference.max_video_frames)") from None
    except (BadDataError, FileNotFoundError) as error:
        raise SystemExit(f"veason infer: infer.input: {error}") from None
    read_s = time.perf_counter() - started
    frames = video.frames
    say(f"video: {cfg.infer.input}: {len(frames)} frames of {frames.shape[2]}x{frames.shape[1]}")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        check_answer_budget(cfg.inference, len(frames) - 1)
        generator = build_answer_generator(cfg, device)
    except ValueError as error:
        raise SystemExit(f"veason infer: {error}") from None
    propagator = mask_propagator_for(cfg, batched=False, device=device)
    segmenter = VideoSegmenter(generator, propagator, cfg.data.eval_num_frames, cfg.data.frame_size)
    result = segmenter.segment(frames, cfg.infer.query)
    result.seconds = {"read": read_s, **result.seconds}
    _, policy_frames = policy_view(frames, cfg.data.eval_num_frames, cfg.data.frame_size)
    fps = video.fps or cfg.infer.fps
    paths = write_outputs(output_folder(cfg), result, frames, video.frame_names, policy_frames, fps)

    covered = int(result.masks.reshape(len(frames), -1).any(axis=1).sum())
    stages = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result.seconds.items())
    say(f"query: {result.query}")
    if result.reasoning:
        say(f"reasoning: {result.reasoning.strip()[:300]}")
    if result.empty_reason:
        say(f"no masks: {result.empty_reason}")
    else:
        say(
            f"keyframe {result.keyframe}, {len(result.boxes)} box(es); masks on {covered}/{len(frames)} frames"
        )
    say(f"stages: {stages}")
    for name, path in paths.items():
        say(f"  {name:<8} {path}")
    return 0
