"""Can a small random-init Qwen2.5-VL learn to box a described object, and what lets it?

The learning run (docs/benchmarks.md, "Learning, measured") found a ~28 M policy that CoT-SFT taught the answer
format perfectly but whose boxes pointed at nothing (box IoU ~0.004). This probe isolates the grounding part:
one frame of the synthetic world, a question about one object, the answer `[x1, y1, x2, y2]` in 560 space,
answer-only cross-entropy, AdamW with warm-up and cosine decay, greedy decoding on held-out frames scored by
box IoU. A variant (`--variants`) sets the task (one: the frame holds one object; colour: "Box the red
object.", the only one of its colour; look: "Box the red star.", the only one of that look), the world's
backdrop (bg=positional | vertical, `WorldConfig.backdrop`), the text model's rotary setting (theta,
sections), the learning rate and the image size (px).

What it found (docs/benchmarks.md, "the grounding probe"): the learning rate decides. At lr 1e-3 (the SFT
recipe's) no variant boxed better than a typical box (IoU 0.03-0.07) within 64 K examples, whatever the rotary
setting or task, and 3e-3 diverged; at 3e-4 the single-object task reached IoU 0.52 after 1,000 steps of 64 on an
H100. The positional backdrop makes it come sooner (tiny CPU model: IoU 0.47 against 0.14 on the vertical one
after 2,000 steps). Described objects (colour, look: 3-6 objects in the frame) stayed at IoU ~0.03 through
2,000 steps of 64 at 3e-4, their losses still falling; with half the training frames holding one object
(`one=0.5`) "Box the red object." reached 0.14-0.24 after 1,500-3,000 steps: an object is boxed, the described
one little better than chance. `--save` writes the trained model as a warm start for `sft_format.py --init`.

    python3 benchmarks/grounding_probe.py --out /tmp/probe --steps 5000 --batch 64 --budget-s 510 \\
        --variants name=one,task=one,lr=3e-4         # GPU: IoU 0.52 at step 1,000 (~3 min), one process
    python3 benchmarks/grounding_probe.py --out /tmp/probe_cpu --steps 20 --examples 64 --eval-examples 16 \\
        --variants name=cpu,px=112 --hidden 128 --layers 2 --vision-depth 1   # CPU check of the script
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from veason_ray.synth.world import BACKDROPS  # noqa: E402

TASKS = ("look", "colour", "one")  # see make_examples
DEFAULT_VARIANTS = (  # at lr 3e-4 on an H100: one grounds (IoU 0.52 by step 1,000), colour and look not by 2,000
    "name=one,task=one",
    "name=one_vertical,task=one,bg=vertical",
    "name=colour,task=colour",
    "name=look,task=look",
)


@dataclass(frozen=True)
class Variant:
    """One probe run: `name=...` plus any of theta, sections (t/h/w), lr, task (look | colour | one), px, bg and
    one (the share of training frames that hold one object, mixed into a look or colour task's; evaluation
    stays on the task's own frames) and every (every=1: every describable object of a training frame is an
    example of its own, so one frame comes with several questions and answers)."""

    name: str
    rope_theta: float = 1e6
    mrope_section: tuple[int, int, int] = (8, 12, 12)
    lr: float = 3e-4
    task: str = "look"
    px: int = 224
    bg: str = "positional"
    one: float = 0.0
    every: bool = False

    @classmethod
    def parse(cls, text: str) -> Variant:
        """`name=a,theta=10,sections=8/12/12,lr=1e-3,task=colour,px=448,bg=vertical` (every key but name
        optional)."""
        fields: dict[str, Any] = {}
        try:
            for item in text.split(","):
                key, value = item.split("=", 1)
                if key == "name":
                    fields["name"] = value
                elif key == "theta":
                    fields["rope_theta"] = float(value)
                elif key == "sections":
                    t, h, w = (int(v) for v in value.split("/"))
                    fields["mrope_section"] = (t, h, w)
                elif key == "lr":
                    fields["lr"] = float(value)
                elif key == "task":
                    if value not in TASKS:
                        raise ValueError(f"task {value!r} is not one of {', '.join(TASKS)}")
                    fields["task"] = value
                elif key == "px":
                    fields["px"] = int(value)
                elif key == "bg":
                    if value not in BACKDROPS:
                        raise ValueError(f"bg {value!r} is not one of {', '.join(BACKDROPS)}")
                    fields["bg"] = value
                elif key == "every":
                    fields["every"] = value not in ("0", "false", "no")
                elif key == "one":
                    fields["one"] = float(value)
                    if not 0.0 <= fields["one"] <= 1.0:
                        raise ValueError(f"one={value} is not a share in [0, 1]")
                else:
                    raise ValueError(f"unknown key {key!r}")
            return cls(**fields)
        except (ValueError, TypeError) as e:
            raise SystemExit(
                f"grounding_probe: --variants entry {text!r}: {e}; write name=...,theta=...,sections=t/h/w,"
                "lr=...,task=look|colour|one,px=...,bg=positional|vertical,one=0.5,every=1"
            ) from e


def make_examples(
    count: int, seed: int, px: int, task: str, bg: str, every: bool = False
) -> tuple[Any, list[str], list[list[int]]]:
    """`count` frames of the synthetic world resized to px x px (uint8, (N, px, px, 3)), the question about each
    and the integer 560-space box of the visible target. task "look": the target is the only object of its
    colour and shape ("Box the red star."); "colour": the only one of its colour ("Box the red object."); "one":
    the frame holds that one object. `every`: each object of the frame that can be described becomes an example
    of its own (the same frame with different questions and answers), instead of one object drawn at random."""
    import cv2
    import numpy as np

    from veason_ray.synth.world import WorldConfig, simulate_scene

    rng = np.random.default_rng(seed)
    world = WorldConfig(num_frames=4, backdrop=bg)
    if task == "one":
        world = WorldConfig(num_frames=4, backdrop=bg, min_objects=1, max_objects=1)
    frames, questions, boxes = [], [], []
    while len(frames) < count:
        scene = simulate_scene(rng, world)
        frame = int(rng.integers(0, world.num_frames))
        looks = [(o.colour, o.shape) if task != "colour" else o.colour for o in scene.objects]
        unique = [
            i for i, look in enumerate(looks) if looks.count(look) == 1 and scene.modal[i, frame].sum() > 30
        ]
        if not unique:
            continue
        image = cv2.resize(scene.render(frame), (px, px), interpolation=cv2.INTER_LINEAR)
        chosen = rng.permutation(unique).tolist() if every else [int(rng.choice(unique))]  # as before
        for i in chosen[: count - len(frames)]:
            ys, xs = np.nonzero(scene.modal[i, frame])
            sx, sy = 560 / world.width, 560 / world.height
            box = [xs.min() * sx, ys.min() * sy, (xs.max() + 1) * sx, (ys.max() + 1) * sy]
            obj = scene.objects[i]
            frames.append(image)
            questions.append(f"Box the {obj.colour} {obj.shape if task != 'colour' else 'object'}.")
            boxes.append([int(round(v)) for v in box])
    return np.stack(frames), questions, boxes


def box_iou(pred: list[float], gt: list[int]) -> float:
    ix = max(0.0, min(pred[2], gt[2]) - max(pred[0], gt[0]))
    iy = max(0.0, min(pred[3], gt[3]) - max(pred[1], gt[1]))
    union = (pred[2] - pred[0]) * (pred[3] - pred[1]) + (gt[2] - gt[0]) * (gt[3] - gt[1]) - ix * iy
    return ix * iy / union if union > 0 else 0.0


def train_variant(variant: Variant, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Train one variant from scratch and return its curve; also appended to <out>/<name>.jsonl as it goes."""
    from veason_ray.cpu_torch_workarounds import apply_cpu_workarounds

    apply_cpu_workarounds()
    import numpy as np
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from benchmarks.sft_format import small_qwen_sizes
    from veason_ray.models.tiny_qwen import build_tiny_processor, qwen2_5_vl_config
    from veason_ray.models.vision_window_attention import batch_vision_windows

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(args.threads)
    processor = build_tiny_processor()
    images = processor.image_processor
    tokenizer = processor.tokenizer
    text, vision = small_qwen_sizes(
        len(tokenizer), args.hidden, args.layers, args.vision_depth, variant.rope_theta, variant.mrope_section
    )
    torch.manual_seed(args.seed)
    model = Qwen2_5_VLForConditionalGeneration(qwen2_5_vl_config(tokenizer, text, vision)).to(device)
    batch_vision_windows(model)  # one attention call per layer for all frames, not one per frame
    singles = round(args.examples * variant.one) if variant.task != "one" else 0
    train_frames, train_questions, train_boxes = make_examples(
        args.examples - singles, args.seed, variant.px, variant.task, variant.bg, variant.every
    )
    if singles:  # one-object frames mixed in (a seed of their own); the sampler draws from all of them
        more = make_examples(singles, args.seed + 2, variant.px, "one", variant.bg)
        train_frames = np.concatenate([train_frames, more[0]])
        train_questions, train_boxes = train_questions + more[1], train_boxes + more[2]
    eval_frames, eval_questions, eval_boxes = make_examples(
        args.eval_examples, args.seed + 1, variant.px, variant.task, variant.bg
    )
    merge = vision["spatial_merge_size"]
    grid = variant.px // vision["patch_size"]
    image_tokens = "<|image_pad|>" * (grid * grid // (merge * merge))

    def prompt(question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True).replace(
            "<|image_pad|>", image_tokens
        )

    prompts = [tokenizer(prompt(q))["input_ids"] for q in train_questions]
    answers = [tokenizer(json.dumps(b) + "<|im_end|>")["input_ids"] for b in train_boxes]
    eval_prompts = [tokenizer(prompt(q))["input_ids"] for q in eval_questions]
    on_device = {  # frames stay uint8 on the device; the processor's own torch ops patchify each batch there
        "train": torch.from_numpy(train_frames).to(device),
        "eval": torch.from_numpy(eval_frames).to(device),
    }
    thw = torch.tensor([[1, grid, grid]], device=device)

    def pixels(split: str, index: Any) -> dict[str, Any]:
        x = on_device[split][torch.as_tensor(index, device=device)].permute(0, 3, 1, 2).float()
        x = images.rescale_and_normalize(
            x, True, images.rescale_factor, True, images.image_mean, images.image_std
        )
        patches, _, _ = images.patchify(x, vision["patch_size"], merge, vision["temporal_patch_size"])
        return {
            "pixel_values": patches.reshape(-1, patches.shape[-1]),
            "image_grid_thw": thw.repeat(len(x), 1),
        }

    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def pad(rows: list[list[int]], left: bool) -> tuple[Any, Any]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            span = slice(width - len(r), width) if left else slice(0, len(r))
            ids[i, span], mask[i, span] = torch.tensor(r), 1
        return ids.to(device), mask.to(device)

    def token_types(ids: Any) -> dict[str, Any]:
        """`mm_token_type_ids` (1 on image tokens): without it transformers gives the image tokens plain 1-D
        positions instead of Qwen2.5-VL's (t, h, w) M-RoPE positions."""
        return {"mm_token_type_ids": (ids == image_pad).int()}

    def rope_positions(rows: list[list[int]]) -> list[Any]:
        """Each sequence's (3, length) M-RoPE positions, computed once: HF's get_rope_index walks every sequence
        in Python, so the training steps pass these instead."""
        positions = []
        for k in range(0, len(rows), 256):
            chunk = rows[k : k + 256]
            ids, mask = pad(chunk, left=False)
            found, _ = model.model.get_rope_index(
                ids, image_grid_thw=thw.repeat(len(chunk), 1), attention_mask=mask, **token_types(ids)
            )
            positions += [found[:, r, : len(row)] for r, row in enumerate(chunk)]
        return positions

    sequences = [p + a for p, a in zip(prompts, answers, strict=True)]
    positions = rope_positions(sequences)

    def evaluate() -> tuple[float, str]:
        model.eval()
        scores, last = [], ""
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            for k in range(0, len(eval_prompts), args.eval_batch):
                index = list(range(k, min(k + args.eval_batch, len(eval_prompts))))
                ids, mask = pad([eval_prompts[i] for i in index], left=True)
                out_ids = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    **pixels("eval", index),
                    max_new_tokens=24,
                    do_sample=False,
                )
                for row, i in zip(out_ids[:, ids.shape[1] :], index, strict=True):
                    last = tokenizer.decode(row, skip_special_tokens=True).strip()
                    try:
                        pred = [float(v) for v in json.loads(last)]
                        scores.append(box_iou(pred, eval_boxes[i]) if len(pred) == 4 else 0.0)
                    except (ValueError, TypeError):
                        scores.append(0.0)
        model.train()
        return float(np.mean(scores)), last

    optimizer = torch.optim.AdamW(model.parameters(), lr=variant.lr, weight_decay=0.01)
    rng = np.random.default_rng(args.seed)
    log_path = out / f"{variant.name}.jsonl"
    log_path.unlink(missing_ok=True)
    curve: list[dict[str, Any]] = []
    losses: list[float] = []  # training losses since the last evaluation
    start = time.perf_counter()
    model.train()
    deadline = start + args.budget_s if args.budget_s > 0 else float("inf")
    for step in range(args.steps + 1):
        last_step = step == args.steps or time.perf_counter() > deadline
        if step % args.eval_every == 0 or last_step:
            iou, sample = evaluate()
            row = {"step": step, "iou": iou, "seconds": time.perf_counter() - start, "sample": sample}
            row["examples_seen"] = step * args.batch
            if losses:
                row["loss"] = float(np.mean(losses))  # mean training loss since the last evaluation
                losses.clear()
            curve.append(row)
            with log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(
                f"[{variant.name}] step {step} loss {row.get('loss', float('nan')):.3f} IoU {iou:.3f} "
                f"({row['seconds']:.0f} s) {sample!r}",
                flush=True,
            )
        if last_step:
            break
        lr = (
            variant.lr
            * min(1.0, (step + 1) / args.warmup)
            * 0.5
            * (1 + math.cos(math.pi * step / args.steps))
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = rng.integers(0, len(prompts), args.batch).tolist()
        ids, mask = pad([sequences[i] for i in index], left=False)
        position_ids = torch.zeros((3, *ids.shape), dtype=torch.long, device=device)
        labels = ids.clone()
        for r, i in enumerate(index):
            position_ids[:, r, : positions[i].shape[1]] = positions[i]
            labels[r, : len(prompts[i])] = -100  # answer tokens only
        labels[mask == 0] = -100
        x = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids, **pixels("train", index)}
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(**x, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if args.save:
        from benchmarks.sft_format import save_small_qwen
        from veason_ray.models.tiny_qwen import cap_image_pixels

        cap_image_pixels(processor, variant.px * variant.px)
        saved = save_small_qwen(model, processor, Path(args.save) / variant.name)
        print(f"[{variant.name}] saved to {saved} (a warm start: sft_format.py --init {saved})", flush=True)
    return {"variant": asdict(variant), "curve": curve}


def _worker(variant: Variant, args: argparse.Namespace, out: Path) -> None:
    result = train_variant(variant, args, out)
    (out / f"{variant.name}.json").write_text(json.dumps(result) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), help="name:theta:t,h,w:lr")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vision-depth", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--examples", type=int, default=12000, help="distinct training frames")
    parser.add_argument("--eval-examples", type=int, default=128)
    parser.add_argument("--eval-batch", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--threads", type=int, default=4, help="torch threads per variant process")
    parser.add_argument(
        "--parallel",
        action="store_true",
        help="all variants at once, one process each (H100: ~0.2-0.37 s per step each with 4-7 processes, against "
        "0.11 s alone; steps are bound by per-call overheads of HF's Qwen2.5-VL, not the GPU): default one after "
        "another",
    )
    parser.add_argument(
        "--budget-s", type=float, default=0, help="per variant: stop training after this (0: none)"
    )
    parser.add_argument(
        "--save",
        default="",
        help="write each variant's trained model to <save>/<name> (bf16, the processor capped at px x px): a "
        "grounding warm start for sft_format.py --init",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = [Variant.parse(v) for v in args.variants]
    context = mp.get_context("spawn")
    procs = [context.Process(target=_worker, args=(v, args, out), name=v.name) for v in variants]
    for group in [procs] if args.parallel else [[p] for p in procs]:
        for p in group:
            p.start()
        for p in group:
            p.join()
    print(
        "\n| variant | task | px | rope_theta | mrope_section | lr | held-out box IoU (step: IoU) | last loss |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for v in variants:
        path = out / f"{v.name}.json"
        if not path.exists():
            print(
                f"| {v.name} | {v.task} | {v.px} | {v.rope_theta:g} | {list(v.mrope_section)} | {v.lr:g} | failed | |"
            )
            continue
        curve = json.loads(path.read_text())["curve"]
        points = ", ".join(f"{r['step']}: {r['iou']:.3f}" for r in curve)
        loss = curve[-1].get("loss", float("nan"))
        print(
            f"| {v.name} | {v.task} | {v.px} | {v.rope_theta:g} | {list(v.mrope_section)} | {v.lr:g} | {points} "
            f"| {loss:.3f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
