"""The policy behind the inference seam, built from the config for a process that holds it itself
(`veason infer`, the Serve app): a vLLM rollout engine in this process (the engine code of training,
`RolloutEngine.answer`) or Hugging Face `generate` (`inference.generator`).

Talks to: the model folder (a hub id, a local folder or an s3:// copy, resolved once) and nothing else.
"""

from __future__ import annotations

from veason_ray.config import VeasonConfig
from veason_ray.inference import AnswerGenerator


def build_answer_generator(cfg: VeasonConfig, device: str) -> AnswerGenerator:
    """`inference.generator` for `model.policy` on `device` ("cuda" or "cpu"; vLLM picks its own)."""
    inference = cfg.inference
    cache_dir = cfg.model.cache_dir or None
    if inference.generator == "vllm":
        from actors.rollout import EngineAnswerGenerator, RolloutEngine
        from veason_ray.models.loading import resolve_model_dir

        model_dir = resolve_model_dir(cfg.model.policy, cfg.storage, cache_dir)
        engine = RolloutEngine(str(model_dir), cfg.rollout, cfg.model.dtype, cfg.run.seed)
        return EngineAnswerGenerator(engine, inference)
    if inference.constrain_answer:
        raise ValueError(
            "inference.constrain_answer needs inference.generator=vllm (constrained decoding is vLLM's "
            "structured outputs); set inference.generator=vllm or inference.constrain_answer=false"
        )
    from veason_ray.models.hf_policy import GenerationSettings, HFAnswerGenerator, HFPolicy
    from veason_ray.models.loading import load_policy

    model, processor = load_policy(
        cfg.model.policy,
        dtype=cfg.model.dtype,
        device=device,
        attn_implementation=cfg.model.attn_implementation,
        storage=cfg.storage,
        cache_dir=cache_dir,
    )
    settings = GenerationSettings(
        max_new_tokens=inference.max_new_tokens, temperature=inference.temperature, seed=cfg.run.seed
    )
    return HFAnswerGenerator(HFPolicy(model, processor), settings)
