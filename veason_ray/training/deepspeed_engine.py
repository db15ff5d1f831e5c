"""The trainable policy inside a DeepSpeed ZeRO engine, built from `learner.*` of the config tree.

- Model: Qwen2.5-VL loaded in bf16 (or fp32 with `learner.bf16=false`), optionally with the vision tower
  frozen (`freeze_vision`: the ViT and its patch merger) and LoRA adapters on the language model's linear
  layers only (`lora.*`; the vision tower's MLP shares layer names, so the targets are matched under
  `language_model`). Gradient checkpointing (non-reentrant) when asked. The vision tower's windows are batched
  (`veason_ray/models/vision_window_attention.py`) unless flash attention is configured; RMSNorm and SwiGLU run as
  fused compiled kernels with `fused_elementwise` (`veason_ray/models/fused_elementwise.py`).
- Optimizer: AdamW with the paper's defaults. Where DeepSpeed's own optimizers would be JIT-compiled for no
  gain it gets a torch AdamW: on CPU always (no compiler round-trip in CI), on GPU without offload (fused
  torch AdamW); with optimizer offload on GPU it gets DeepSpeedCPUAdam, whose vectorised CPU step is several
  times faster than torch's on the offloaded fp32 states (`learner.optimizer` forces either).
- Gradient accumulation is ours: the number of micro-batches varies from step to step, so the caller marks the
  accumulation boundary itself (`set_gradient_accumulation_boundary` on the last micro-batch), calls `step`
  once per rollout batch and scales each micro-batch's loss so their sum is the batch's loss
  (`grpo_policy_loss(normalizer=...)`, `backward(scale_wrt_gas=False)`). Under bf16 ZeRO-2 the sum is kept in
  float32 on the GPU (`grad_accum_dtype`): DeepSpeed's bf16 sum with optimizer offload copies every gradient
  to the CPU and back at each micro-batch. DeepSpeed 0.19's unmanaged mode
  (`managed_gradient_accumulation: false`) drops all but the last micro-batch's gradients under ZeRO-3
  (measured: `tests/test_learner.py` against plain torch), so it is not used.
- Learning rate: constant after an optional linear warm-up (`warmup_steps`), a scheduler DeepSpeed saves
  and restores with its checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from veason_ray.config import LearnerConfig
from veason_ray.models.fused_elementwise import fuse_elementwise
from veason_ray.models.vision_window_attention import batch_vision_windows


def deepspeed_config(cfg: LearnerConfig, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config dict of `learner.*`."""
    if cfg.offload_params and cfg.zero_stage != 3:
        raise ValueError(
            f"learner.offload_params needs learner.zero_stage=3 (got {cfg.zero_stage}); "
            "ZeRO-2 offloads optimizer states only (learner.offload_optimizer)"
        )
    zero: dict[str, Any] = {
        "stage": cfg.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": on_gpu and cfg.zero_stage >= 2,
        "reduce_bucket_size": int(cfg.reduce_bucket_mb * 2**20),
        "allgather_bucket_size": int(cfg.reduce_bucket_mb * 2**20),
    }
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # weights leave through named_weights
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        "bf16": {"enabled": cfg.bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if cfg.bf16 and cfg.zero_stage == 2 and cfg.grad_accum_dtype == "float32":
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def load_trainable_policy(model_dir: str, cfg: LearnerConfig, attn_implementation: str = "sdpa") -> Any:
    """The policy to train: Qwen2.5-VL from `model_dir`, vision tower frozen / LoRA / gradient checkpointing
    as `cfg` says. Returns the model (a peft model with LoRA)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        model_dir,
        dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
        attn_implementation=attn_implementation,
    )
    model.config.use_cache = False
    batch_vision_windows(model)
    fuse_elementwise(model, cfg.fused_elementwise)
    if cfg.freeze_vision:
        model.model.visual.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        targets = "|".join(cfg.lora.target_modules)
        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.lora.rank,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=rf".*language_model.*\.({targets})",
            ),
        )
    return model


def load_frozen_policy(
    model_dir: str,
    bf16: bool,
    device: torch.device,
    attn_implementation: str = "sdpa",
    fused_elementwise: bool = False,
) -> Any:
    """A frozen copy of a policy (the reference model of the KL term), in eval mode on `device`;
    `fused_elementwise` as `learner.fused_elementwise`."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.bfloat16 if bf16 else torch.float32, attn_implementation=attn_implementation
    )
    model.requires_grad_(False)
    batch_vision_windows(model)
    fuse_elementwise(model, fused_elementwise)
    return model.to(device).eval()


def make_optimizer(
    params: list[torch.nn.Parameter], cfg: LearnerConfig, on_gpu: bool
) -> torch.optim.Optimizer:
    """AdamW (lr, betas, weight decay of `cfg`), the implementation chosen as the module docstring says."""
    choice = cfg.optimizer
    if choice == "auto":
        choice = "deepspeed" if on_gpu and cfg.offload_optimizer else "torch"
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "weight_decay": cfg.weight_decay}
    if choice == "deepspeed":
        from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

        if cfg.offload_optimizer:
            return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
        return FusedAdam(params, adam_w_mode=True, **kwargs)
    if choice != "torch":
        raise ValueError(f"learner.optimizer: unknown {cfg.optimizer!r}; one of auto, torch, deepspeed")
    return torch.optim.AdamW(params, fused=on_gpu and not cfg.offload_optimizer, **kwargs)


def constant_with_warmup(
    optimizer: torch.optim.Optimizer, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """lr * min(1, (step + 1) / warmup_steps); constant when warmup_steps is 0 (the paper)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)
    )


def build_engine(
    model: Any, cfg: LearnerConfig, on_gpu: bool, lr_multiplier: Callable[[int], float] | None = None
) -> Any:
    """`deepspeed.initialize` of `model` (wrapped in a ResponseScorer of `cfg.logprob_chunk_tokens`) with the
    optimizer above and a LambdaLR of `lr_multiplier` (optimizer step -> factor of cfg.lr; default
    `constant_with_warmup`'s); torch.distributed must be initialised (`deepspeed.init_distributed`)."""
    import deepspeed

    from veason_ray.training.policy_forward import ResponseScorer

    model = ResponseScorer(model, cfg.logprob_chunk_tokens)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the policy has no trainable parameters (learner.freeze_vision and LoRA settings)")
    optimizer = make_optimizer(params, cfg, on_gpu)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=(
            constant_with_warmup(optimizer, cfg.warmup_steps)
            if lr_multiplier is None
            else torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier)
        ),
        config=deepspeed_config(cfg, on_gpu),
    )
    return engine
