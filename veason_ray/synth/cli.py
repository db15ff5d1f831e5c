"""``veason synth``: write the synthetic dataset (the embedded default dataset and the data of the tests)."""

from __future__ import annotations

import argparse

from veason_ray.config import SynthConfig
from veason_ray.synth.writer import LAYOUTS, write_synthetic_dataset


def add_object_arguments(parser: argparse.ArgumentParser) -> None:
    """--min-objects / --max-objects: how many objects a scene holds (also benchmarks/sft_format.py's world)."""
    d = SynthConfig()
    parser.add_argument(
        "--min-objects",
        type=int,
        default=d.min_objects,
        help=f"objects per scene, at least (default: {d.min_objects})",
    )
    parser.add_argument(
        "--max-objects",
        type=int,
        default=d.max_objects,
        help=f"objects per scene, at most (default: {d.max_objects}); 1 and 1: every target is the only object",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SynthConfig()
    parser.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    parser.add_argument("--layout", choices=LAYOUTS, default="revos", help="on-disk format (default: revos)")
    parser.add_argument(
        "--videos", type=int, default=d.videos, help=f"number of videos (default: {d.videos})"
    )
    parser.add_argument(
        "--frames", type=int, default=d.frames, help=f"frames per video (default: {d.frames})"
    )
    parser.add_argument(
        "--height", type=int, default=d.height, help=f"frame height, px (default: {d.height})"
    )
    parser.add_argument("--width", type=int, default=d.width, help=f"frame width, px (default: {d.width})")
    add_object_arguments(parser)
    parser.add_argument("--seed", type=int, default=d.seed, help=f"same seed, same bytes (default: {d.seed})")
    parser.add_argument(
        "--valid-fraction",
        type=float,
        default=d.valid_fraction,
        help=f"share of videos in the ReVOS valid split, ViCaS's val and test (default: {d.valid_fraction})",
    )


def run(args: argparse.Namespace) -> int:
    """Write the dataset (to a local folder or s3://, storage from the AWS environment) and print a summary."""
    summary = write_synthetic_dataset(
        args.out,
        layout=args.layout,
        num_videos=args.videos,
        num_frames=args.frames,
        height=args.height,
        width=args.width,
        seed=args.seed,
        valid_fraction=args.valid_fraction,
        min_objects=args.min_objects,
        max_objects=args.max_objects,
    )
    print(summary.to_text())
    return 0
