"""Prompt + response token sequences with their images, batched for the learner.

A prompt is encoded once per GRPO group with the model's processor, exactly as the rollout engine renders it
(`actors/rollout.py`: the chat template over `Sample.messages()` with the frames as images), so the learner's
token ids, M-RoPE positions and vision tokens are those generation used. Each response is appended to its
prompt. A micro-batch is either right-padded rows with an attention mask (`collate`), or packed (`collate(...,
packed=True)`): every sequence's tokens back to back in one row, no padding, with the row bounds that keep each
sequence's attention within itself (`veason_ray/training/packed_attention.py`). `pack_by_tokens` forms packed
micro-batches by a token budget, so an uneven batch costs its tokens, not its longest row times the rows.

Vision special tokens inside a response (`<|image_pad|>` ...; a random policy emits them, see
`rollout.suppress_vision_tokens`) cannot be fed back: Qwen2.5-VL would count them as image slots. They are fed as
the pad token instead; the sampled token itself keeps its log-probability (its context is what the engine saw)
and every later token of that response is left out of the loss, since its context no longer matches.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import torch

# Tokens only the processor may place in a prompt: the rollout engine never samples them (when asked to) and the
# learner feeds any a response contains as pad (see the module docstring).
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")

# Processor outputs batched along the token axis (one value per prompt token); everything else the processor
# returns (pixel_values, image_grid_thw) is concatenated over the batch's images.
_NOT_PER_TOKEN = ("input_ids", "attention_mask")


@dataclass
class EncodedPrompt:
    """One rendered prompt: token ids (P,), per-token extra inputs such as `mm_token_type_ids` (P,), and the
    vision inputs of its images (`pixel_values` (patches, dim), `image_grid_thw` (images, 3))."""

    input_ids: torch.Tensor
    token_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    vision_inputs: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.input_ids.numel())


def vision_token_ids(tokenizer: Any) -> list[int]:
    """The ids of VISION_TOKENS in `tokenizer` (those it knows)."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
    return sorted({i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id})


def encode_prompt(processor: Any, messages: Sequence[dict[str, Any]]) -> EncodedPrompt:
    """The prompt of `messages` (our chat-content format, images inline) as the model reads it, ending with the
    assistant turn's header (the generation prompt)."""
    from veason_ray.models.hf_policy import split_images

    stripped, images = split_images(messages)
    text = processor.apply_chat_template(stripped, tokenize=False, add_generation_prompt=True)
    out = processor(text=[text], images=images or None, return_tensors="pt")
    length = out["input_ids"].shape[1]
    token_inputs, vision_inputs = {}, {}
    for key, value in out.items():
        if key in _NOT_PER_TOKEN or not isinstance(value, torch.Tensor):
            continue
        if value.dim() == 2 and value.shape == (1, length):
            token_inputs[key] = value[0]
        else:
            vision_inputs[key] = value
    return EncodedPrompt(out["input_ids"][0], token_inputs, vision_inputs)


@dataclass
class PolicySequence:
    """One response to learn from. response_ids (R,); advantage: the GRPO advantage of the response;
    old_logprobs / ref_logprobs (R,) float32 under the sampling policy and the reference (None until known)."""

    prompt: EncodedPrompt
    response_ids: torch.Tensor
    advantage: float = 0.0
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + int(self.response_ids.numel())


def loss_mask(response_ids: torch.Tensor, forbidden_ids: Iterable[int]) -> torch.Tensor:
    """(R,) bool: True up to and including the first forbidden (vision) token, False after it."""
    forbidden = torch.as_tensor(sorted(set(forbidden_ids)), dtype=response_ids.dtype)
    hit = (
        torch.isin(response_ids, forbidden)
        if forbidden.numel()
        else torch.zeros_like(response_ids, dtype=bool)
    )
    after_first = (torch.cumsum(hit.long(), 0) - hit.long()) > 0
    return ~after_first


@dataclass
class MicroBatch:
    """The tensors of B sequences, right-padded (B rows of L tokens) or packed (one row of their T tokens).

    input_ids, attention_mask: (B, L) or (1, T); token_inputs: per-token extra inputs, the same shape;
    row_bounds: packed only, the B + 1 offsets of the sequences in the row; attention_bucket: > 0 when attention
    runs causal without a padding mask at lengths rounded up to this multiple (`learner.attention_bucket_tokens`:
    padded rows are that long already; a packed row's sequences are padded inside attention); prompt_lengths (B,);
    vision_inputs: concatenated over the images of the batch's distinct prompts (a GRPO group's responses share
    one prompt, whose images the vision tower then encodes once); prompt_of_row (B,): each sequence's index among
    those prompts; images_per_prompt: their image counts. response_positions (B, R): for response token j of
    sequence b, the position whose logits predict it (its start + prompt length + j - 1); response_ids (B, R);
    response_mask (B, R) float, 1 on tokens that enter the loss; advantages (B,); old_logprobs / ref_logprobs
    (B, R) or None."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_inputs: dict[str, torch.Tensor]
    vision_inputs: dict[str, torch.Tensor]
    prompt_of_row: list[int]
    images_per_prompt: list[int]
    response_positions: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    advantages: torch.Tensor
    old_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    response_lengths: list[int]
    prompt_lengths: list[int]
    row_bounds: tuple[int, ...] | None = None
    attention_bucket: int = 0

    @property
    def packed(self) -> bool:
        return self.row_bounds is not None

    def to(self, device: torch.device | str) -> MicroBatch:
        def move(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return x.to(device, non_blocking=True)
            if isinstance(x, dict):
                return {k: move(v) for k, v in x.items()}
            return x

        return MicroBatch(**{name: move(getattr(self, name)) for name in self.__dataclass_fields__})

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(
    sequences: Sequence[PolicySequence],
    pad_id: int,
    forbidden_ids: Iterable[int] = (),
    packed: bool = False,
    attention_bucket: int = 0,
) -> MicroBatch:
    """One micro-batch, right-padded or `packed` (see MicroBatch); forbidden (vision) ids in responses are fed
    as `pad_id` and masked as `loss_mask` says. `attention_bucket` > 0: padded rows are as long as the longest
    sequence rounded up to its multiple, and the batch asks for causal attention without a padding mask."""
    if not sequences:
        raise ValueError("collate needs at least one sequence")
    if attention_bucket < 0:
        raise ValueError(f"learner.attention_bucket_tokens must be >= 0, got {attention_bucket}")
    forbidden = sorted(set(forbidden_ids))
    lengths = [s.num_tokens for s in sequences]
    starts = list(accumulate(lengths[:-1], initial=0)) if packed else [0] * len(lengths)
    rows, length = (1, sum(lengths)) if packed else (len(sequences), round_up(max(lengths), attention_bucket))
    width = max(1, max(int(s.response_ids.numel()) for s in sequences))
    batch = len(sequences)
    input_ids = torch.full((rows, length), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, length), dtype=torch.long)
    keys = sorted(sequences[0].prompt.token_inputs)
    token_inputs = {
        k: torch.zeros((rows, length), dtype=sequences[0].prompt.token_inputs[k].dtype) for k in keys
    }
    positions = torch.zeros((batch, width), dtype=torch.long)
    targets = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.float32)
    old = torch.zeros((batch, width)) if all(s.old_logprobs is not None for s in sequences) else None
    ref = torch.zeros((batch, width)) if all(s.ref_logprobs is not None for s in sequences) else None
    for row, seq in enumerate(sequences):
        prompt, response = seq.prompt, seq.response_ids.long()
        p, r = len(prompt), int(response.numel())
        fed = response.clone()
        if forbidden:
            fed[torch.isin(fed, torch.tensor(forbidden, dtype=fed.dtype))] = pad_id
        line, at = (0, starts[row]) if packed else (row, 0)
        input_ids[line, at : at + p] = prompt.input_ids
        input_ids[line, at + p : at + p + r] = fed
        attention[line, at : at + p + r] = 1
        for k in keys:
            token_inputs[k][line, at : at + p] = prompt.token_inputs[k]  # response tokens are text (0)
        positions[row, :r] = torch.arange(at + p - 1, at + p + r - 1)
        targets[row, :r] = response
        mask[row, :r] = loss_mask(response, forbidden).float()
        if old is not None:
            old[row, :r] = seq.old_logprobs
        if ref is not None:
            ref[row, :r] = seq.ref_logprobs
    distinct: dict[int, int] = {}  # id(prompt) -> index among the distinct prompts
    prompt_of_row = [distinct.setdefault(id(s.prompt), len(distinct)) for s in sequences]
    prompts = list({id(s.prompt): s.prompt for s in sequences}.values())
    vision_keys = sorted(sequences[0].prompt.vision_inputs)
    vision = {k: torch.cat([p.vision_inputs[k] for p in prompts]) for k in vision_keys}
    grids = [p.vision_inputs.get("image_grid_thw") for p in prompts]
    return MicroBatch(
        input_ids=input_ids,
        attention_mask=attention,
        token_inputs=token_inputs,
        vision_inputs=vision,
        prompt_of_row=prompt_of_row,
        images_per_prompt=[0 if g is None else int(g.shape[0]) for g in grids],
        response_positions=positions,
        response_ids=targets,
        response_mask=mask,
        advantages=torch.tensor([float(s.advantage) for s in sequences], dtype=torch.float32),
        old_logprobs=old,
        ref_logprobs=ref,
        response_lengths=[int(s.response_ids.numel()) for s in sequences],
        prompt_lengths=[len(s.prompt) for s in sequences],
        row_bounds=(*starts, sum(lengths)) if packed else None,
        attention_bucket=attention_bucket,
    )


def round_up(length: int, multiple: int) -> int:
    """`length` rounded up to a multiple of `multiple` (itself when `multiple` is 0)."""
    return -(-length // multiple) * multiple if multiple > 0 else length


def split_micro_batches(items: Sequence[Any], size: int) -> list[list[Any]]:
    """Consecutive chunks of at most `size` items (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"learner.micro_batch_size must be >= 1, got {size}")
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def pack_by_tokens(sequences: Sequence[PolicySequence], budget: int) -> list[list[PolicySequence]]:
    """`sequences` in order as micro-batches of at most `budget` tokens each (prompt + response; a longer
    sequence alone). A run of sequences sharing a prompt (a GRPO group) is kept in one micro-batch when it fits
    in one, so the vision tower encodes its images once: it starts a new micro-batch rather than straddle two;
    a run larger than the budget fills micro-batches one sequence at a time."""
    if budget < 1:
        raise ValueError(f"learner.micro_batch_tokens must be >= 1 to pack, got {budget}")
    runs: list[list[PolicySequence]] = []
    for seq in sequences:
        if runs and runs[-1][0].prompt is seq.prompt:
            runs[-1].append(seq)
        else:
            runs.append([seq])
    chunks: list[list[PolicySequence]] = []
    used = budget
    for run in runs:
        size = sum(s.num_tokens for s in run)
        if size <= budget and used + size > budget:  # the group fits a micro-batch of its own: start one
            chunks.append([])
            used = 0
        for seq in run:
            if used + seq.num_tokens > budget and chunks and chunks[-1]:
                chunks.append([])
                used = 0
            if not chunks:
                chunks.append([])
            chunks[-1].append(seq)
            used += seq.num_tokens
    return chunks
