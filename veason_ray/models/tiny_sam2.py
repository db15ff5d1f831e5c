"""A random-init SAM2 checkpoint at a small input resolution, for tests and the CPU demo.

The folder it writes holds what a real SAM2 release pairs: the checkpoint `sam2_tiny.pt` in the released format
(`{"model": state_dict}`) and the config it was built from, `sam2_tiny.yaml`: sam2.1 hiera-tiny with
`image_size` (default 256 pixels; 0.16 s per frame on 2 CPU cores against 7.3 s at 1024) and the memory
attention's RoPE feature sizes set to match (image_size / 16).

Why a yaml beside the checkpoint rather than a config name plus overrides: the folder is self-contained (an
s3:// copy carries its config along, and nothing depends on which configs a sam2 install packages), and
`load_sam2_video_predictor` reads it through the same sam2 builder as the packaged configs, the path any user
with a custom SAM2 config takes.
"""

from __future__ import annotations

from pathlib import Path

from veason_ray.cpu_torch_workarounds import apply_cpu_workarounds

apply_cpu_workarounds()

import sam2  # noqa: E402,F401  (importing sam2 registers its packaged configs with hydra)
import torch  # noqa: E402
from hydra import compose  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

SAM2_TINY_BASE_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
SAM2_TINY_DIRNAME = "sam2_tiny"
SAM2_TINY_CHECKPOINT = "sam2_tiny.pt"
SAM2_TINY_CONFIG = "sam2_tiny.yaml"
_BACKBONE_STRIDE = 16  # pixels per feature-map cell at the memory attention's resolution


def tiny_sam2_config_yaml(image_size: int = 256) -> str:
    """The yaml text of sam2.1 hiera-tiny at `image_size` pixels (a multiple of 32, the Hiera trunk's stride)."""
    if image_size <= 0 or image_size % 32:
        raise ValueError(f"SAM2 image_size must be a positive multiple of 32, got {image_size}")
    feat = image_size // _BACKBONE_STRIDE
    cfg = compose(
        config_name=SAM2_TINY_BASE_CONFIG,
        overrides=[
            f"++model.image_size={image_size}",
            f"++model.memory_attention.layer.self_attention.feat_sizes=[{feat},{feat}]",
            f"++model.memory_attention.layer.cross_attention.feat_sizes=[{feat},{feat}]",
        ],
    )
    return "# @package _global_\n\n" + OmegaConf.to_yaml(cfg)


def write_tiny_sam2(out_dir: str | Path, seed: int = 0, image_size: int = 256) -> Path:
    """Write `sam2_tiny.pt` (random init, deterministic in `seed`) and `sam2_tiny.yaml` into `out_dir`;
    returns the folder."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_text = tiny_sam2_config_yaml(image_size)
    (out_dir / SAM2_TINY_CONFIG).write_text(config_text)
    cfg = OmegaConf.create(config_text)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = instantiate(cfg.model, _recursive_=True)
    torch.save({"model": model.state_dict()}, out_dir / SAM2_TINY_CHECKPOINT)
    return out_dir
