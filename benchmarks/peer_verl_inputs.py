"""What verl's trainer reads in benchmarks/peer_grpo_step.py (issue 29), and verl's own check of it.

The work of benchmarks/grpo_step.py in verl's RLHFDataset form: one parquet row per prompt group, our chat
(veason_ray.prompts) with an `<image>` placeholder where each frame goes in the user turn, the frames as lossless
PNG bytes in `images` (`make_groups`' pixels), rows in step order; and the reward file verl loads by path
(`reward.custom_reward_function`), which scores every response 0. `check_with_verl` composes verl's config from the
overrides, validates it as main_ppo does and lets verl's dataset read the first row back: its rendered prompt must
be the text our rollout sends vLLM.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from benchmarks.rollout import make_groups
from veason_ray.prompts import build_messages
from veason_ray.records import PromptGroup, Sample

REWARD_SOURCE = '''"""Rewards do not matter for time (issue 29): every response scores 0."""


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    return 0.0
'''


def placeholder_chat(sample: Sample) -> list[dict[str, str]]:
    """Our chat (veason_ray.prompts) in verl's dataset form: string turns, `<image>` where each frame goes."""
    chat = []
    for message in build_messages(sample.frame_indices, sample.record.expression):
        content = message["content"]
        if not isinstance(content, str):
            content = "".join("<image>" if item["type"] == "image" else item["text"] for item in content)
        chat.append({"role": message["role"], "content": content})
    return chat


def dataset_groups(args: argparse.Namespace) -> list[PromptGroup]:
    """The rows in step order (verl reads them in order, `--prompts` a step). Each timed step gets the groups
    benchmarks/grpo_step.py times (its warm-up is group 0, then `--prompts` a step); warm-up steps come first with
    group 0 and groups past the timed ones."""
    timed, warm = args.steps * args.prompts, args.warmup_steps * args.prompts
    groups = make_groups(1 + timed + max(warm - 1, 0), args.frames, args.size)
    return ([groups[0], *groups[1 + timed :]] if warm else []) + groups[1 : 1 + timed]


def write_dataset(groups: list[PromptGroup], path: Path) -> None:
    """One row per group in verl's RLHFDataset form; frames as lossless PNG (the same pixels as ours)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    def png(frame) -> dict[str, bytes]:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="PNG", compress_level=1)
        return {"bytes": buffer.getvalue()}

    rows = [
        {
            "data_source": "veason_benchmark",
            "prompt": placeholder_chat(g.sample),
            "images": [png(frame) for frame in g.sample.frames],
            "ability": "grounding",
            "reward_model": {"style": "rule", "ground_truth": ""},
            "extra_info": {"split": "train", "index": g.group_id},
        }
        for g in groups
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)


def our_prompt(processor, group: PromptGroup) -> tuple[str, int]:
    """The prompt text our rollout sends vLLM for `group`, and its token count with the images expanded."""
    from actors.rollout import vllm_prompt

    prompt = vllm_prompt(processor, group.sample.messages())
    images = prompt["multi_modal_data"]["image"]
    return prompt["prompt"], len(processor(text=[prompt["prompt"]], images=images)["input_ids"][0])


def write_inputs(args: argparse.Namespace, work: Path) -> tuple[str, int, int]:
    """train.parquet and reward.py under `work`; returns our rollout's prompt text for the first row, its tokens
    and the number of rows."""
    groups = dataset_groups(args)
    text, tokens = our_prompt(load_processor(args.model), groups[0])
    write_dataset(groups, work / "train.parquet")
    (work / "reward.py").write_text(REWARD_SOURCE)
    return text, tokens, len(groups)


def load_processor(model: str):
    """The policy folder's processor; before the folder exists (a dry run), the one write_random_3b saves there."""
    if (Path(model) / "config.json").is_file():
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(model)
    from veason_ray.models.tiny_qwen import build_tiny_processor

    return build_tiny_processor()


def check_with_verl(
    overrides: list[str], model: str, ours: str, work: Path, verl_site: str, engines: bool
) -> dict:
    """verl's composed config, validated as main_ppo validates it, and verl's dataset reading the first row and
    rendering it: the text must be ours; with `engines`, verl's FSDP engine and vLLM server modules imported too
    (what a missing package breaks, found in seconds rather than after verl's start-up). Runs in a spawned process
    (verl's imports may touch CUDA, which this process leaves to verl's); needs verl importable (the GPU machine,
    or `verl_site`)."""
    if verl_site:
        sys.path.insert(0, verl_site)
    if engines:
        import verl.workers.engine_workers
        import verl.workers.rollout.vllm_rollout.vllm_async_server  # noqa: F401
    import verl
    from hydra import compose, initialize_config_dir
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config
    from verl.utils.dataset.rl_dataset import RLHFDataset

    with initialize_config_dir(
        config_dir=str(Path(verl.__file__).parent / "trainer/config"), version_base=None
    ):
        cfg = compose(config_name="ppo_trainer", overrides=overrides)
    validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)
    processor = load_processor(model)
    dataset = RLHFDataset(str(work / "train.parquet"), processor.tokenizer, cfg.data, processor)
    messages = dataset[0]["raw_prompt"]
    images = RLHFDataset._process_multi_modal_info(messages, 14, cfg.data)[0]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    tokens = len(processor(text=[text], images=images)["input_ids"][0])
    if text != ours:
        raise RuntimeError(f"verl renders another prompt than ours:\n{text[:400]}\n---\n{ours[:400]}")
    return {"verl_version": verl.__version__, "verl_prompt_tokens": tokens, "rows": len(dataset)}
