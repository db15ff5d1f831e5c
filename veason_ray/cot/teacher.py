"""The CoT teacher seam: a VLM behind an OpenAI-compatible endpoint, or the offline ground-truth teacher.

Both take a :class:`~veason_ray.cot.jobs.CoTJob` and its instruction and return a
:class:`~veason_ray.cot.client.ChatReply`; :func:`think_text` turns any reply into the `<think>` part of the
record or raises :class:`UnusableReplyError` (the sample is then recorded as failed, with that reason).
"""

from __future__ import annotations

import asyncio
import re
from typing import Protocol

from veason_ray.cot.client import ChatCompletionsClient, ChatReply, image_data_url
from veason_ray.cot.frames import encode_jpeg
from veason_ray.cot.jobs import CoTJob
from veason_ray.cot.teacher_prompts import TeacherInstruction, teacher_messages

TEACHER_JPEG_QUALITY = 95
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL | re.IGNORECASE)
_ANSWER_BLOCK = re.compile(r"<answer>.*?(</answer>|$)", re.DOTALL | re.IGNORECASE)
_TAG = re.compile(r"</?\s*(think|answer)\s*>", re.IGNORECASE)
_MENTIONS_BOXES = re.compile(
    r"\bred\s+(bounding\s+)?(box|boxes|rectangle|rectangles|frame|outline)\b", re.IGNORECASE
)


class UnusableReplyError(ValueError):
    """A teacher reply that cannot become a chain of thought (no text, cut short, empty, mentions the boxes)."""


class Teacher(Protocol):
    """Writes the chain of thought of one sample. ``name`` goes into each record (`offline`, `openai:<model>`)."""

    name: str

    async def write_cot(self, job: CoTJob, instruction: TeacherInstruction) -> ChatReply: ...


def think_text(reply: ChatReply) -> str:
    """The `<think>` text of a reply: the text inside <think></think> when the teacher used the tags, with any
    <answer> block and stray think/answer tags removed (they would break the record's format), stripped.
    UnusableReplyError when the reply has no text, was cut at max_tokens, is empty after cleaning, or mentions
    the red boxes (the policy never sees them, so a CoT about them teaches it to invent them)."""
    if reply.text is None:
        raise UnusableReplyError("the reply has no text content")
    if reply.finish_reason == "length":
        raise UnusableReplyError("the reply was cut at cot.max_tokens (finish_reason 'length')")
    inside = _THINK.search(reply.text)
    text = inside.group(1) if inside else reply.text
    text = _TAG.sub("", _ANSWER_BLOCK.sub("", text)).strip()
    if not text:
        raise UnusableReplyError("the reply has no text besides tags")
    if _MENTIONS_BOXES.search(text):
        raise UnusableReplyError("the reply mentions the red boxes, which the policy does not see")
    return text


class OpenAITeacher:
    """A VLM behind an OpenAI-compatible chat-completions endpoint: the boxed frames go as base64 JPEG data URLs."""

    def __init__(self, client: ChatCompletionsClient, max_tokens: int = 1024, temperature: float = 0.7):
        self.client, self.max_tokens, self.temperature = client, max_tokens, temperature
        self.name = f"openai:{client.endpoint.model}"

    async def write_cot(self, job: CoTJob, instruction: TeacherInstruction) -> ChatReply:
        urls = await asyncio.to_thread(
            lambda: [image_data_url(encode_jpeg(image, TEACHER_JPEG_QUALITY)) for image in job.teacher_images]
        )
        messages = teacher_messages(job.frame_indices, urls, instruction)
        return await self.client.complete(messages, max_tokens=self.max_tokens, temperature=self.temperature)
