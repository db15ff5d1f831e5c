"""Answer generation with plain Hugging Face `generate`: the policy as evaluation and the demo run it on CPU,
and the baseline the vLLM rollout pool is measured against.

Messages are chat turns in the Qwen2.5-VL content format: a list of `{"role", "content"}` where content items
are `{"type": "text", "text": ...}` or `{"type": "image", "image": <HxWx3 uint8 array or PIL image>}`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from veason_ray.inference import AnswerGenerator, PolicyInput


@dataclass
class GenerationSettings:
    """Decoding settings; temperature 0 means greedy."""

    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


def split_images(messages: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """The messages with image payloads replaced by bare `{"type": "image"}` placeholders (what the chat
    template renders as vision tokens), and the images in the order they appear."""
    images: list[Image.Image] = []
    stripped: list[dict[str, Any]] = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            stripped.append(dict(message))
            continue
        items = []
        for item in content:
            if item.get("type") == "image":
                payload = item.get("image")
                if payload is None:
                    raise ValueError(
                        "an image content item has no 'image' payload (HxWx3 uint8 array or PIL image)"
                    )
                images.append(
                    payload if isinstance(payload, Image.Image) else Image.fromarray(np.asarray(payload))
                )
                items.append({"type": "image"})
            else:
                items.append(item)
        stripped.append({**message, "content": items})
    return stripped, images


class HFPolicy:
    """A Qwen2.5-VL model and its processor that answer batches of multi-image chat prompts."""

    def __init__(self, model: Any, processor: Any) -> None:
        self.model = model.eval()
        self.processor = processor
        # Batched generation of a decoder-only model needs the prompts aligned on the right.
        self.processor.tokenizer.padding_side = "left"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, conversations: Sequence[Sequence[dict[str, Any]]]) -> dict[str, torch.Tensor]:
        """Processor inputs (input_ids, attention_mask, pixel_values, image_grid_thw) for a batch of
        conversations, each ending before the assistant turn."""
        texts: list[str] = []
        images: list[Image.Image] = []
        for messages in conversations:
            stripped, conv_images = split_images(messages)
            texts.append(
                self.processor.apply_chat_template(stripped, tokenize=False, add_generation_prompt=True)
            )
            images.extend(conv_images)
        inputs = self.processor(text=texts, images=images or None, return_tensors="pt", padding=True)
        return {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}

    @torch.inference_mode()
    def generate(
        self, conversations: Sequence[Sequence[dict[str, Any]]], settings: GenerationSettings
    ) -> list[str]:
        """One decoded answer (special tokens removed) per conversation."""
        if not conversations:
            return []
        inputs = self.encode(conversations)
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        sample = settings.temperature > 0
        kwargs: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens, "do_sample": sample}
        if sample:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
        output = self.model.generate(**inputs, **kwargs)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)


class HFAnswerGenerator(AnswerGenerator):
    """The inference seam on Hugging Face `generate` in this process: `batch_size` inputs per call (greedy at
    temperature 0). No constrained decoding (that is vLLM's structured outputs)."""

    def __init__(self, policy: HFPolicy, settings: GenerationSettings, batch_size: int = 8):
        self.policy, self.settings, self.batch_size = policy, settings, max(1, batch_size)

    def answer(self, inputs: Sequence[PolicyInput]) -> list[str]:
        answers: list[str] = []
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start : start + self.batch_size]
            answers.extend(self.policy.generate([item.messages() for item in chunk], self.settings))
        return answers
