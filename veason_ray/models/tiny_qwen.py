"""A tiny random-init Qwen2.5-VL in Hugging Face format, built offline, for tests and the CPU demo.

It has the real model's architecture, tokenizer pipeline, special tokens, chat template and image processor,
only at toy sizes, so every code path that loads, prompts, generates with or trains the real checkpoint runs
on it unchanged: transformers' `AutoProcessor` / `Qwen2_5_VLForConditionalGeneration.from_pretrained` and
vLLM's `LLM(model=...)` load the folder it writes.

- Tokenizer: Qwen2's byte-level BPE pipeline (NFC, Qwen's pre-tokenizer regex, one token per digit), trained
  in-process on a small built-in corpus of our prompts and answers. Byte-level, so any text round-trips.
  Qwen2.5-VL's 14 special tokens come first (ids 0..13); the config's token ids are read from the tokenizer.
- Text model: hidden 128, 2 layers, 4 attention heads of 32 (vLLM needs head size >= 32), 2 KV heads,
  M-RoPE sections [4, 6, 6] (Qwen's [16, 24, 24] scaled to head size 32), word embeddings tied as in the 3B.
- Vision tower: 2 blocks, hidden 64, 2 heads of 32, patch 14, spatial merge 2, temporal patch 2, output 128.
- Weights: random init (initializer range 0.02, deterministic in the seed), stored in bf16 like the releases.
- Image processor: Qwen's own limits (min 3,136, max 12,845,056 pixels), so a 560x560 frame is kept at
  560x560: 40x40 patches, merged 2x2 into 400 visual tokens, exactly as in the real checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from veason_ray.cpu_torch_workarounds import apply_cpu_workarounds
from veason_ray.prompts import render_instruction

apply_cpu_workarounds()

import torch  # noqa: E402
from transformers import (  # noqa: E402
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

# Qwen2.5-VL's special tokens, in the order of the real vocabulary (151643.. there, 0.. here).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The chat template of the Qwen2.5-VL-Instruct checkpoints (chat_template.json), verbatim.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# What the tokenizer is trained on: the shapes of our prompts and answers, so they tokenize compactly.
_CORPUS_SENTENCES = (
    "You are a helpful assistant.",
    "Given the expression, find the timestamp of the frame where the target is best represented, "
    "then give the bounding boxes of every target object in that frame.",
    "Think about the question inside <think></think> and give the final answer inside <answer></answer>.",
    "Output the answer as JSON with the keys keyframe_timestamp and bbox_2d_list.",
    "The video shows a person riding a bike along the road while a dog runs after it.",
    "The animal that is about to jump is the cat on the left; it is most visible in this frame.",
    "the man in the red shirt, the woman holding an umbrella, the car turning right, the bird flying away",
    "Describe the video, justify the keyframe, locate the target objects in the keyframe.",
)
_CORPUS_ANSWERS = (
    '<think>The target is clearest at 12s.</think>\n<answer>{"keyframe_timestamp": 12, '
    '"bbox_2d_list": [[104.5, 220.0, 318.25, 547.75]]}</answer>',
    '<think>Two objects match.</think><answer>{"keyframe_timestamp": 3, '
    '"bbox_2d_list": [[0, 0, 280, 280], [281.5, 96.12, 559, 559]]}</answer>',
    '<think>No object matches the expression.</think><answer>{"keyframe_timestamp": 0, '
    '"bbox_2d_list": []}</answer>',
)
# The language of the synthetic world (veason_ray/synth: colours, shapes, sizes, events, relations) and of the
# offline teacher's chains of thought, so that its words are whole tokens, as they are in Qwen's 151 K vocabulary.
# Trained on the sentences above alone, "purple" was six byte pieces and "triangle" six: a small policy had to
# assemble a colour word before it could look for that colour, and did not learn to pick the described object
# out of several (docs/benchmarks.md, "the grounding probe").
_CORPUS_WORLD = (
    "the small red circle, the large green square, the blue triangle, the yellow star, the purple shape, the cyan "
    "object, the two circles, the three squares, all the triangles, the four stars, five shapes, six objects.",
    "the shape that never moves; the object that stays still the whole time; the shape that leaves the frame; "
    "the object that moves out of view; which shape is about to leave the scene? the shape that enters the frame; "
    "the object that comes into view later on; the shape that moves the fastest; which object is moving faster "
    "than all the others? the shapes moving to the left, to the right, upwards, downwards; the objects travelling "
    "leftwards, rightwards, heading towards the top of the frame or the bottom of the frame.",
    "the shape that passes in front of the red circle; the object that covers part of the blue square; the shape "
    "that goes behind the green star; the object that the yellow triangle partly hides; the shape moving towards "
    "the purple circle; the object heading for the cyan square; the shape that the red star collides with first; "
    "the object that first bumps into the blue triangle; the two shapes that collide first; which two objects "
    "touch each other first?",
    "The video is shown in 4 frames, from 0s to 13s. The expression 'the small star' refers to one object, which is "
    "visible at 0s, 5s, 9s and out of sight at 13s. At 5s the target covers about 2.8% of the image and the target "
    "is nearly as large there as at its largest (9s), so this frame is where it is best represented. In that frame "
    "there are 2 targets: a small object in the upper left of the frame; a medium-sized object in the centre of "
    "the frame; a large object in the lower right of the frame; the middle centre.",
    render_instruction("the red circle", 4),
)
TOKENIZER_CORPUS = (
    _CORPUS_SENTENCES * 4
    + _CORPUS_WORLD * 4
    + _CORPUS_ANSWERS * 8
    + tuple(f"({index}s)" for index in range(0, 200, 7))
    + ('0123456789 [], {} ": .-',) * 8
)
TOKENIZER_VOCAB_SIZE = 1024  # an upper bound: merges run out on this corpus at 830 tokens

# Qwen2.5-VL-Instruct's image processor limits (preprocessor_config.json).
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 16384
TINY_QWEN_DIRNAME = "qwen2_5_vl_tiny"
TINY_MARKER = "veason_tiny.json"  # what write_tiny_qwen wrote into its folder: kind, seed, image_pixels


def build_tiny_tokenizer() -> Qwen2Tokenizer:
    """Qwen2's tokenizer pipeline with a small byte-level BPE vocabulary trained on TOKENIZER_CORPUS."""
    # The untrained Qwen2Tokenizer already holds <|endoftext|> (id 0); the other special tokens follow it.
    tokenizer = Qwen2Tokenizer().train_new_from_iterator(
        list(TOKENIZER_CORPUS),
        vocab_size=TOKENIZER_VOCAB_SIZE,
        new_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
    )
    # As in the real checkpoint: generation stops at <|im_end|>, padding uses <|endoftext|>.
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.model_max_length = 32768
    tokenizer.chat_template = QWEN2_5_VL_CHAT_TEMPLATE
    return tokenizer


def build_tiny_processor() -> Qwen2_5_VLProcessor:
    """The processor (tokenizer + Qwen2-VL image and video processors + chat template) of the tiny model."""
    tokenizer = build_tiny_tokenizer()
    vision_sizes = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, **vision_sizes),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**vision_sizes),
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )


def qwen2_5_vl_config(
    tokenizer: Qwen2Tokenizer, text_sizes: dict[str, Any], vision_sizes: dict[str, Any]
) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config of the given text and vision sizes, with its special-token ids read from `tokenizer`
    (as the released checkpoints wire them) and tied embeddings, stored in bf16."""
    token_id = tokenizer.convert_tokens_to_ids
    text_config = {
        **text_sizes,
        "bos_token_id": token_id("<|endoftext|>"),
        "eos_token_id": token_id("<|im_end|>"),
        "pad_token_id": token_id("<|endoftext|>"),
        "tie_word_embeddings": True,
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_sizes,
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
        tie_word_embeddings=True,
        dtype="bfloat16",
    )


def tiny_qwen_config(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLConfig:
    """Tiny Qwen2.5-VL sizes; vocabulary and special-token ids come from `tokenizer`."""
    text_sizes = {
        "vocab_size": len(tokenizer),
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "max_window_layers": 2,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
    }
    vision_sizes = {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 2,
        "out_hidden_size": 128,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "tokens_per_second": 2,
        "window_size": 112,
        "fullatt_block_indexes": [1],
    }
    return qwen2_5_vl_config(tokenizer, text_sizes, vision_sizes)


def cap_image_pixels(processor: Any, image_pixels: int) -> None:
    """Cap the image processor's pixels per image (112 * 112: 16 visual tokens per frame instead of 400 for a
    560x560 frame; 224 * 224: 64). The training, generation and rollout paths all read the processor from the
    model's folder, so the cap holds everywhere the folder is used."""
    images = processor.image_processor
    images.size = {
        "shortest_edge": min(images.size["shortest_edge"], image_pixels),
        "longest_edge": image_pixels,
    }
    images.max_pixels = image_pixels


def tiny_qwen_marker(out_dir: str | Path) -> dict[str, Any] | None:
    """What `write_tiny_qwen` recorded in a folder it wrote (kind, seed, image_pixels); None for any other."""
    marker = Path(out_dir) / TINY_MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None


def write_tiny_qwen(out_dir: str | Path, seed: int = 0, image_pixels: int = 0) -> Path:
    """Write the tiny model, tokenizer, processor and generation config into `out_dir`; deterministic in
    `seed`. `image_pixels` > 0 caps the processor's pixels per image (`cap_image_pixels`). Returns the folder."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    processor = build_tiny_processor()
    if image_pixels > 0:
        cap_image_pixels(processor, image_pixels)
    config = tiny_qwen_config(processor.tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.to(torch.bfloat16)  # stored in bf16, as the released checkpoints are
    model.generation_config.eos_token_id = [config.text_config.eos_token_id, config.text_config.bos_token_id]
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    marker = {"kind": "qwen2_5_vl_tiny", "seed": seed, "image_pixels": image_pixels}
    (out_dir / TINY_MARKER).write_text(json.dumps(marker) + "\n")
    return out_dir
