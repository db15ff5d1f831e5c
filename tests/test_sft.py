"""CoT-SFT: the sequence and loss mask of a record (tokenizer level), the LoRA-merged export, and `veason sft`
end to end on a local Ray cluster (Ray Train, 2 gloo ranks, DeepSpeed ZeRO-2, the tiny Qwen2.5-VL in float32)
on the offline teacher's records of the synthetic world.

One module-scoped SFT run (a few steps, ~1 minute on 2 cores); the other tests read what it wrote.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

for _key, _value in {
    "RAY_AUTH_MODE": "disabled",
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "offline",
}.items():
    os.environ.setdefault(_key, _value)

from pipelines.cli import main as veason  # noqa: E402
from veason_ray.answer_parsing import parse_answer  # noqa: E402
from veason_ray.config import LearnerConfig, LoRAConfig  # noqa: E402
from veason_ray.cot.records import load_sft_example, read_jsonl  # noqa: E402
from veason_ray.prompts import render_answer  # noqa: E402
from veason_ray.training.sequences import collate  # noqa: E402
from veason_ray.training.sft import (  # noqa: E402
    rank_share,
    score_answers,
    sft_sequence,
    split_held_out,
    step_schedule,
    summed_nll,
    teacher_box_iou,
    warmup_cosine,
)

STEPS = 4  # sft.epochs=2 x (8 training records / sft.batch_size=4)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from veason_ray.models.tiny_qwen import write_tiny_qwen

    return write_tiny_qwen(tmp_path_factory.mktemp("sft_model") / "qwen2_5_vl_tiny", seed=0)


@pytest.fixture(scope="module")
def cot_records(synthetic_revos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The offline teacher's records with 2 frames each (short prompts keep the CPU run small)."""
    out = tmp_path_factory.mktemp("sft_cot")
    args = [
        "cot",
        f"data.root={synthetic_revos}",
        "cot.teacher=offline",
        "cot.num_frames=2",
        f"cot.output_dir={out}",
    ]
    assert veason(args) == 0
    return out / "cot.jsonl"


@pytest.fixture(scope="module")
def sft_run(tiny_model: Path, cot_records: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import ray

    out = tmp_path_factory.mktemp("sft_out")
    args = [
        "sft",
        f"model.policy={tiny_model}",
        "model.dtype=float32",
        f"sft.records={cot_records}",
        f"sft.output_dir={out}",
        "sft.max_examples=10",
        "sft.held_out_fraction=0.2",
        "sft.epochs=2",
        "sft.batch_size=4",
        "sft.lr=2e-3",
        "sft.eval_max_new_tokens=12",
        "sft.eval_every=2",  # a parse-rate check on the ranks during training
        "learner.workers=2",
        "learner.gpus_per_worker=0",
        "learner.zero_stage=2",
        "learner.bf16=false",
        "learner.gradient_checkpointing=false",
        "learner.micro_batch_size=1",
        "learner.export_dtype=float32",
        "placement.num_cpus=2",
        "trainer.wandb.mode=disabled",
    ]
    try:
        assert veason(args) == 0
    finally:
        ray.shutdown()
    return out


def _processor(model_dir: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir)


def _state(model_dir: Path) -> dict[str, torch.Tensor]:
    """The float32 weights of a checkpoint under the module names `named_weights` exports."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    return dict(model.state_dict())


def test_response_is_the_assistant_turn_up_to_the_end_token(tiny_model: Path, cot_records: Path):
    processor = _processor(tiny_model)
    tokenizer = processor.tokenizer
    record = next(read_jsonl(cot_records))
    messages, answer = load_sft_example(record, str(cot_records.parent))
    seq = sft_sequence(processor, messages, answer)
    batch = collate([seq], pad_id=tokenizer.pad_token_id)
    masked = batch.response_ids[0][batch.response_mask[0] > 0]
    assert tokenizer.decode(masked) == answer + "<|im_end|>"
    # The whole conversation as the chat template renders it = prompt, then the response, then the newline the
    # template writes between turns (never generated: generation stops at <|im_end|>).
    from veason_ray.models.hf_policy import split_images

    stripped, images = split_images([*messages, {"role": "assistant", "content": answer}])
    text = processor.apply_chat_template(stripped, tokenize=False)
    full = processor(text=[text], images=images, return_tensors="pt")["input_ids"][0]
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert full.tolist() == seq.prompt.input_ids.tolist() + seq.response_ids.tolist() + newline
    # the logits that predict the response are those of the positions just before each response token
    prompt_len = len(seq.prompt)
    assert batch.response_positions[0, 0] == prompt_len - 1
    assert batch.input_ids[0, prompt_len : prompt_len + len(masked)].tolist() == masked.tolist()


def test_split_schedule_and_loss_normalisation():
    train, held = split_held_out(20, 0.1, seed=3)
    assert len(held) == 2 and sorted(train + held) == list(range(20))
    assert split_held_out(20, 0.1, seed=3) == (train, held) and split_held_out(20, 0.1, seed=4) != (
        train,
        held,
    )
    steps = step_schedule(10, 4, epochs=2, seed=0, min_batch=3)
    assert [len(s) for s in steps] == [4, 4, 4, 4]  # the 2-example remainder of each epoch is < 3 ranks
    assert steps[:2] != steps[2:]  # a fresh shuffle per epoch
    assert sorted(
        rank_share(steps[0], 0, 3) + rank_share(steps[0], 1, 3) + rank_share(steps[0], 2, 3)
    ) == sorted(steps[0])
    with pytest.raises(ValueError):
        step_schedule(10, 2, epochs=1, seed=0, min_batch=3)
    # micro-batch parts normalised by the global count sum to the global token mean
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    parts = summed_nll(logprobs[:1], mask[:1], 5.0) + summed_nll(logprobs[1:], mask[1:], 5.0)
    assert parts.item() == pytest.approx(3.0)


def test_warmup_then_cosine_decay():
    factors = [warmup_cosine(step, 4, 20) for step in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]  # linear warm-up, peak on the warm-up's last step
    assert factors[4] == 1.0 and factors[12] == pytest.approx(0.5)  # half-way through the decay
    assert all(a > b for a, b in zip(factors[4:], factors[5:], strict=False))
    assert 0 < factors[-1] < 0.01  # near zero on the last step, never negative
    assert warmup_cosine(0, 0, 10) == 1.0 and warmup_cosine(30, 4, 20) == 0.0


def test_format_score_counts_keyframes_among_the_prompt_frames():
    shown = render_answer("at 5s", 5, [[0, 0, 10, 10]])
    unseen = render_answer("at 7s", 7, [[0, 0, 10, 10]])  # parses, but 7 was not a prompt frame
    broken = '<think>x</think>\n<answer>{"keyframe_timestamp": 5, "bbox_2d_list": [[3.0.0]]}</answer>'
    teacher = {"frame_indices": [0, 5, 10], "keyframe": 5, "boxes_560": [[0, 0, 10, 10]]}
    references = [teacher, teacher, {"frame_indices": [5], "keyframe": 5, "boxes_560": [[0, 0, 10, 10]]}]
    score = score_answers([shown, unseen, broken], references)
    assert (score.parsed, score.format_match, score.keyframe_in_prompt) == (2, 3, 1)
    assert score.failures == {"invalid_json": 1}
    assert score.keyframe_in_prompt_rate == pytest.approx(1 / 3)
    # grounding against the teacher: only `shown` chose its keyframe, with its very box
    assert (score.teacher_keyframe, score.teacher_box_iou_sum) == (1, pytest.approx(1.0))
    assert (score + score).keyframe_in_prompt == 2
    assert (score + score).teacher_box_iou_mean == pytest.approx(1 / 3)
    assert score_answers([shown]).keyframe_in_prompt == 0  # without the references nothing is counted


def test_teacher_box_iou_is_the_spatial_reward_at_the_teachers_keyframe():
    teacher = {"frame_indices": [0, 5], "keyframe": 5, "boxes_560": [[0, 0, 9, 9], [20, 20, 29, 29]]}
    half = render_answer("at 5s", 5, [[0, 0, 9, 9]])  # one of two targets, exactly
    elsewhere = render_answer("at 0s", 0, [[0, 0, 9, 9], [20, 20, 29, 29]])  # right boxes, other frame
    assert teacher_box_iou(parse_answer(half), teacher) == pytest.approx(0.5)
    assert teacher_box_iou(parse_answer(elsewhere), teacher) == 0.0
    assert teacher_box_iou(parse_answer("no answer"), teacher) == 0.0


def test_lora_export_is_base_plus_delta(tiny_model: Path, tmp_path: Path):
    from veason_ray.training.deepspeed_engine import load_trainable_policy
    from veason_ray.training.policy_weights import export_hf_folder

    cfg = LearnerConfig(
        bf16=False, gradient_checkpointing=False, lora=LoRAConfig(enabled=True, rank=4, alpha=8)
    )
    model = load_trainable_policy(str(tiny_model), cfg)
    with torch.no_grad():  # LoRA starts with B = 0; give every adapter a delta
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.1)
    out = export_hf_folder(model, _processor(tiny_model), tmp_path / "hf", torch.float32)
    exported = _state(out)
    base = _state(tiny_model)
    layer = model.base_model.model.model.language_model.layers[0].self_attn.q_proj
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * (8 / 4)
    assert torch.allclose(exported[name], base[name].float() + delta, atol=1e-6)
    assert not torch.allclose(exported[name], base[name].float())
    vision = "model.visual.blocks.0.mlp.up_proj.weight"  # not a LoRA target: exported as it was
    assert torch.equal(exported[vision], base[vision].float())


def test_sft_loss_falls_and_the_export_is_a_trained_model(sft_run: Path, tiny_model: Path):
    rows = list(read_jsonl(sft_run / "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r["examples"] == 4 and r["tokens"] > 0 for r in rows)
    assert [r["step"] for r in rows if "eval_parse_rate" in r] == [2, 4]
    assert all(r["eval_examples"] == 2 for r in rows if "eval_examples" in r)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    # the held-out NLL at each epoch's end; the lr decays along the cosine from sft.lr (no warm-up)
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]
    assert all(0 < r["eval_loss"] < rows[0]["loss"] + 1 for r in rows if "eval_loss" in r)
    assert [r["lr"] for r in rows] == pytest.approx([2e-3 * warmup_cosine(i, 0, STEPS) for i in range(STEPS)])
    summary = json.loads((sft_run / "sft_summary.json").read_text())
    assert summary["final_held_out_loss"] == rows[-1]["eval_loss"]
    assert summary["train_examples"] == 8 and summary["held_out_examples"] == 2
    assert summary["before"]["examples"] == summary["after"]["examples"] == 2
    assert 0 <= summary["after"]["keyframe_in_prompt_rate"] <= summary["after"]["parse_rate"]
    for score in (summary["before"], summary["after"]):  # every answer either parses or has its reason
        assert score["parse_rate"] * 2 + sum(score["failures"].values()) == pytest.approx(2)
        assert len(score["samples"]) == 2
    assert (sft_run / "loss_curve.png").stat().st_size > 1000
    start, trained = _state(tiny_model), _state(sft_run / "hf")
    assert start.keys() == trained.keys()
    changed = [k for k, v in start.items() if not torch.equal(trained[k], v)]
    assert len(changed) > len(start) // 2  # a full fine-tune moves (nearly) every tensor
    assert (sft_run / "hf" / "chat_template.jinja").exists() or (
        sft_run / "hf" / "chat_template.json"
    ).exists()
