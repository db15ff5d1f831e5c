"""The policy deployment of the Serve app: the trained policy behind the inference seam (`AnswerGenerator`),
answering `PolicyInput`s with the answer text (greedy by default: `inference.*`).

It holds what `veason infer` holds: `actors/answer_generators.build_answer_generator` (a vLLM engine of the
rollout code, or Hugging Face generate). Requests that arrive together are answered by one generate call
(`serve.policy.max_batch_size`, `serve.policy.batch_wait_timeout_s`), in which vLLM batches them continuously.
The call runs in a worker thread, so the replica keeps answering health checks while it generates.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from ray import serve

from actors.request_batching import each_on_failure
from veason_ray.config import VeasonConfig
from veason_ray.inference import PolicyInput


def policy_name(spec: str) -> str:
    """A checkpoint's name from its spec: the last part of a folder, s3:// prefix or hub id."""
    return spec.rstrip("/").rsplit("/", 1)[-1] or spec


@serve.deployment(name="policy")
class PolicyDeployment:
    def __init__(self, cfg: VeasonConfig):
        import torch

        from actors.answer_generators import build_answer_generator
        from veason_ray.models.loading import checkpoint_version, resolve_model_dir

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.generator = build_answer_generator(cfg, device)
        model_dir = resolve_model_dir(cfg.model.policy, cfg.storage, cfg.model.cache_dir or None)
        self.model = {
            "name": policy_name(cfg.model.policy),
            "version": cfg.serve.model_version or checkpoint_version(Path(model_dir)),
        }
        self._answer_batch.set_max_batch_size(cfg.serve.policy.max_batch_size)
        self._answer_batch.set_batch_wait_timeout_s(cfg.serve.policy.batch_wait_timeout_s)

    def info(self) -> dict[str, str]:
        """The policy's name and version (in every response of the app)."""
        return dict(self.model)

    def check_health(self) -> None:
        """Serve's health check: a dead vLLM engine fails it, and Serve replaces the replica."""
        engine = getattr(self.generator, "engine", None)
        if engine is not None and engine.dead_reason:
            raise RuntimeError(f"the policy's vLLM engine is dead: {engine.dead_reason}")

    async def answer(self, policy_in: PolicyInput) -> str:
        """The answer text to one input (batched with the inputs that arrive with it)."""
        result = await self._answer_batch(policy_in)
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _answer_batch(self, inputs: list[PolicyInput]) -> list[str | Exception]:
        return await asyncio.to_thread(each_on_failure, self.generator.answer, inputs)
