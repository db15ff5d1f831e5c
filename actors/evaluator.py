"""EvaluatorActor: holds one policy (Hugging Face) and one mask propagator (SAM2, or the colour tracker of the
synthetic world: `reward.propagator`), and evaluates expressions one call at a time. The evaluation driver
(`pipelines/evaluate.py`) runs a pool of them; each loads its models once.

Talks to: the dataset (read through `veason_ray.datasets`, local or s3://) and nothing else.
"""

from __future__ import annotations

from pathlib import Path

import torch

from veason_ray.boxes import boxes_560_to_original
from veason_ray.config import VeasonConfig
from veason_ray.cpu_torch_workarounds import apply_cpu_workarounds
from veason_ray.datasets import open_dataset
from veason_ray.evaluation import ExpressionResult, evaluate_answer, load_evaluation_inputs, oracle_response
from veason_ray.models.hf_policy import GenerationSettings, HFPolicy
from veason_ray.models.loading import load_policy
from veason_ray.models.propagator_choice import build_mask_propagator
from veason_ray.visualize import save_png, video_overlay_grid


class EvaluatorActor:
    """One shard of an evaluation: policy + mask propagator on this actor's device."""

    def __init__(self, cfg: VeasonConfig, split: str) -> None:
        apply_cpu_workarounds()
        self.cfg = cfg
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dataset = open_dataset(cfg.data.dataset, cfg.data.root, split, cfg.storage)
        cache_dir = cfg.model.cache_dir or None
        model, processor = load_policy(
            cfg.model.policy,
            dtype=cfg.model.dtype,
            device=self.device,
            attn_implementation=cfg.model.attn_implementation,
            storage=cfg.storage,
            cache_dir=cache_dir,
        )
        self.policy = HFPolicy(model, processor)
        self.propagator = build_mask_propagator(
            cfg.reward, device=self.device, storage=cfg.storage, cache_dir=cache_dir
        )

    def evaluate(
        self, video: str, exp_id: str, seed: int, overlay_path: str | None = None
    ) -> ExpressionResult:
        """Generate an answer for one expression, score it, and optionally draw its masks to `overlay_path`."""
        record = self.dataset.expression(video, exp_id)
        inputs = load_evaluation_inputs(self.dataset, record, self.cfg.data.eval_num_frames)
        settings = GenerationSettings(
            max_new_tokens=self.cfg.eval.max_new_tokens,
            temperature=self.cfg.eval.temperature,
            top_p=self.cfg.rollout.sampling.top_p,
            seed=seed,
        )
        response = self.policy.generate([inputs.messages()], settings)[0]
        result, masks = evaluate_answer(
            inputs, response, self.propagator, self.cfg.reward.weights, self.device
        )
        if self.cfg.eval.score_oracle:
            oracle, _ = evaluate_answer(
                inputs, oracle_response(inputs), self.propagator, self.cfg.reward.weights, self.device
            )
            result.extra["oracle"] = {
                "rewards": oracle.rewards,
                "j": oracle.j,
                "f": oracle.f,
                "jf": oracle.jf,
            }
        if overlay_path:
            boxes = None
            if result.keyframe is not None and result.boxes_560:
                height, width = inputs.frames.shape[1:3]
                boxes = boxes_560_to_original(result.boxes_560, width, height)
            grid = video_overlay_grid(inputs.frames, masks, inputs.gt_masks, result.keyframe, boxes)
            save_png(grid, Path(overlay_path))
            result.extra["overlay"] = overlay_path
        return result
