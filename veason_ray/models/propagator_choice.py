"""The mask propagator named by `reward.propagator`: the one place that turns the config into an implementation
of the `MaskPropagator` seam, for the reward actors (actors/reward.py) and the evaluators (actors/evaluator.py).

"sam2" loads the frozen SAM2 checkpoint of `reward.sam2`; "colour" is the synthetic world's colour tracker and
loads no model at all (SAM2 and torch are only imported on the SAM2 path).
"""

from __future__ import annotations

from typing import get_args, get_type_hints

from veason_ray.config import RewardConfig, StorageConfig, VeasonConfig
from veason_ray.mask_propagation import MaskPropagator

# The values `reward.propagator` may take, read off the config's type so that they are listed once.
PROPAGATOR_NAMES: tuple[str, ...] = get_args(get_type_hints(RewardConfig)["propagator"])


def build_mask_propagator(
    reward_cfg: RewardConfig,
    *,
    device: str,
    storage: StorageConfig | None = None,
    cache_dir: str | None = None,
    batched: bool = False,
) -> MaskPropagator:
    """The propagator of `reward_cfg.propagator` on `device`. For SAM2, `batched` gives the group propagator
    that shares image features across requests (reward scoring), else the plain per-clip one (evaluation);
    the colour tracker ignores `device`, `storage`, `cache_dir` and `batched`."""
    if reward_cfg.propagator == "colour":
        from veason_ray.models.colour_propagator import ColourTrackPropagator

        return ColourTrackPropagator()
    if reward_cfg.propagator != "sam2":
        raise ValueError(
            f"reward.propagator {reward_cfg.propagator!r}: expected one of "
            f"{', '.join(repr(name) for name in PROPAGATOR_NAMES)}"
        )
    from veason_ray.models.loading import load_sam2_video_predictor

    sam2 = reward_cfg.sam2
    predictor = load_sam2_video_predictor(
        sam2.checkpoint,
        sam2.config or None,
        image_size=sam2.image_size or None,
        device=device,
        storage=storage,
        cache_dir=cache_dir,
    )
    if batched:
        from veason_ray.models.sam2_group import SAM2GroupPropagator

        return SAM2GroupPropagator(
            predictor,
            encode_batch_size=reward_cfg.encode_batch_size,
            max_objects_per_batch=reward_cfg.max_objects_per_batch,
            preprocess_threads=sam2.preprocess_threads,
        )
    from veason_ray.models.sam2_propagator import SAM2MaskPropagator

    return SAM2MaskPropagator(predictor, preprocess_threads=sam2.preprocess_threads)


def mask_propagator_for(cfg: VeasonConfig, *, batched: bool, device: str | None = None) -> MaskPropagator:
    """`build_mask_propagator` for a whole config (`reward.*`, `storage`, `model.cache_dir`) on `device`
    (default: the GPU when this process has one, else the CPU)."""
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return build_mask_propagator(
        cfg.reward, device=device, storage=cfg.storage, cache_dir=cfg.model.cache_dir or None, batched=batched
    )
