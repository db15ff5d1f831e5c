"""`veason tiny-models`: write the tiny random-init Qwen2.5-VL and SAM2 checkpoints for tests and the CPU demo."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", required=True, type=Path, help="folder that receives qwen2_5_vl_tiny/ and sam2_tiny/"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument(
        "--sam2-image-size",
        type=int,
        default=256,
        help="SAM2 input resolution in pixels, a multiple of 32 (default 256)",
    )


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run(args: argparse.Namespace) -> int:
    from veason_ray.models.tiny_qwen import TINY_QWEN_DIRNAME, write_tiny_qwen
    from veason_ray.models.tiny_sam2 import SAM2_TINY_DIRNAME, write_tiny_sam2

    qwen_dir = write_tiny_qwen(args.out / TINY_QWEN_DIRNAME, seed=args.seed)
    sam2_dir = write_tiny_sam2(args.out / SAM2_TINY_DIRNAME, seed=args.seed, image_size=args.sam2_image_size)
    for label, folder in (("Qwen2.5-VL (tiny)", qwen_dir), ("SAM2 (tiny)", sam2_dir)):
        print(f"{label}: {folder} ({_folder_size(folder) / 2**20:.1f} MiB)")
        for path in sorted(folder.iterdir()):
            print(f"  {path.name:28s} {path.stat().st_size:>12,d} bytes")
    return 0
