"""Learning, measured (issue 8): CoT-SFT teaches a small Qwen2.5-VL-shaped policy the answer format, then GRPO with
the real driver raises its mean reward and J&F on a held-out synthetic split.

    sft       `benchmarks/sft_format.py` into <out>/sft_stage: random-init policy (~28 M), a fresh synthetic world
              of single-object scenes (LEARNING_SFT; train and valid videos), offline-teacher CoT of the train
              split, `veason sft` (parse rate before and after); `--sft-dir` names a finished sft_format folder
              to reuse instead
    before    `pipelines/evaluate.run_evaluation` of the SFT policy on the valid split (videos never trained
              on): `--eval-expressions` seeded expressions, greedy, J / F / J&F, reward parts, parse rate
    grpo      `pipelines/grpo.train` on the train split with `configs/learning-1gpu.yaml` (colocated on one GPU:
              vLLM engine, DeepSpeed learner and colour-tracker reward actors; policy and reference = the SFT export),
              `--steps` steps of `--prompts` prompts x 8 responses at lr `--lr` (the paper's 1e-6 is for a
              pretrained 3B; see the config)
    after     the same evaluation of the GRPO policy
Each part is skipped when its output exists (<out>/eval_before/summary.json, <out>/grpo/policy_hf, ...), so the
work splits over GPU calls: `--stage sft` (sft, before) then `--stage grpo` (grpo, after; the machine keeps
/tmp between calls; a GRPO run cut short resumes from its last checkpoint); `--stage all` runs everything.
At the end: <out>/curves.png (the driver's reward curves), <out>/grpo_learning.json (written after every part)
and the before/after table with the seeds. Reward variance within groups after SFT is printed from the first
GRPO step: all-equal groups carry no advantage, and a curve flat for that reason is a finding, not a result.

Measured on an H100 (docs/benchmarks.md): held-out reward 2.141 -> 2.773 and J&F 28.3% -> 36.1% in 120 steps.

    W="--videos 1200 --min-objects 1 --max-objects 1"                            # LEARNING_SFT
    python3 benchmarks/sft_format.py --out /tmp/learn/sft_stage --stage data $W  # H100: ~1 min
    python3 benchmarks/sft_format.py --out /tmp/learn/sft_stage --stage sft $W --epochs 5   # ~6 min
    python3 benchmarks/grpo_learning.py --out /tmp/learn --sft-dir /tmp/learn/sft_stage   # ~17 min in all: rerun
        # it in the next 10-minute call (done parts are reused, GRPO resumes from its last checkpoint)
    python benchmarks/grpo_learning.py --out /tmp/learning_cpu --tiny            # CPU check of the script (~2 min)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

for _key, _value in {
    "RAY_AUTH_MODE": "disabled",
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TQDM_DISABLE": "1",
}.items():
    os.environ.setdefault(_key, _value)

from benchmarks import sft_format  # noqa: E402
from benchmarks.sft_format import say  # noqa: E402

CONFIG = "configs/learning-1gpu.yaml"
RESULT_FILE = "grpo_learning.json"
TABLE_ROWS = (
    ("reward: format (of 2)", ("rewards", "format"), "{:.3f}"),
    ("reward: keyframe", ("rewards", "keyframe"), "{:.3f}"),
    ("reward: spatial (box IoU)", ("rewards", "spatial"), "{:.3f}"),
    ("reward: consistency (propagated masks)", ("rewards", "consistency"), "{:.3f}"),
    ("reward: total (of 5)", ("rewards", "total"), "{:.3f}"),
    ("parse rate", ("parse_rate",), "{:.1%}"),
    ("J (overall)", ("subsets", "overall", "j"), "{:.1%}"),
    ("F (overall)", ("subsets", "overall", "f"), "{:.1%}"),
    ("J&F (overall)", ("subsets", "overall", "jf"), "{:.1%}"),
    ("J&F of the ground-truth answers (same propagator)", ("oracle", "jf"), "{:.1%}"),
)
# The learning run's SFT (docs/benchmarks.md, "Learning, measured"): a world of single-object scenes (a 28 M
# random-init policy does not learn to pick one object out of 3-6 in minutes: the grounding probe), 1,200
# videos (~2,000 CoT records), 5 epochs (290 steps of 32; ~6 min with both evaluations on an H100).
LEARNING_SFT = ["--videos", "1200", "--min-objects", "1", "--max-objects", "1", "--epochs", "5"]
# The CPU check: a tiny policy at 16 visual tokens per frame, a few videos, a few steps of everything.
TINY_SFT = [
    "--videos", "12", "--hidden", "128", "--layers", "2", "--vision-depth", "1", "--frames", "2",
    "--image-pixels", str(112 * 112), "--epochs", "2", "--batch-size", "4", "--max-examples", "24",
    "--eval-examples", "4", "--max-new-tokens", "32", "--workers", "1",
]  # fmt: skip
TINY_OVERRIDES = [
    "placement.num_cpus=8",
    "model.dtype=float32",
    "learner.bf16=false",
    "learner.micro_batch_size=4",
    "learner.export_dtype=float32",
    "rollout.n=4",
    "rollout.max_model_len=2048",
    "rollout.sampling.max_new_tokens=48",
    "reward.actors=1",
    "data.num_frames=2",
    "data.eval_num_frames=2",
    "inference.max_new_tokens=48",
    "eval.worst_overlays=1",
    "trainer.sample_images_every=1",
]


def sft_arguments(args: argparse.Namespace, folder: Path) -> list[str]:
    """`sft_format.main`'s arguments for this run: LEARNING_SFT on top of its defaults (the GPU recipe)."""
    return ["--out", str(folder), "--seed", str(args.seed), *LEARNING_SFT, *(TINY_SFT if args.tiny else [])]


def grpo_config(args: argparse.Namespace, sft_dir: Path, out: Path) -> Any:
    """The resolved config of the GRPO run and (with the paper's reward weights, see `evaluation_config`) of
    both evaluations."""
    from veason_ray.config_loading import load_config

    overrides = [
        f"model.policy={sft_dir / 'sft' / 'hf'}",
        f"data.root={sft_dir / 'data'}",
        f"run.output_dir={out / 'grpo'}",
        f"run.seed={args.seed}",
        f"trainer.steps={args.steps}",
        f"trainer.prompts_per_step={args.prompts}",
        f"learner.lr={args.lr}",
        f"eval.max_expressions={args.eval_expressions}",
    ]
    if args.tiny:
        overrides += TINY_OVERRIDES
    return load_config(CONFIG, overrides + list(args.overrides))


def evaluation_config(cfg: Any) -> Any:
    """`cfg` with the paper's reward weights: runs trained with other weights (`reward.weights.consistency=0`)
    are evaluated on the same terms, so their held-out rewards compare."""
    from veason_ray.config import RewardConfig

    evaluated = copy.deepcopy(cfg)
    evaluated.reward.weights = RewardConfig().weights
    return evaluated


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def evaluate_once(cfg: Any, folder: Path, what: str) -> dict[str, Any]:
    """`run_evaluation` of cfg.model.policy into `folder` unless its summary.json exists; the summary."""
    from pipelines.evaluate import format_report, run_evaluation
    from pipelines.ray_runtime import init_ray

    summary = read_json(folder / "summary.json")
    if summary is not None:
        say(f"{what}: reusing {folder / 'summary.json'}")
        return summary
    say(f"{what}: evaluating {cfg.model.policy} on {cfg.eval.max_expressions} expressions of the valid split")
    init_ray(cfg.placement)
    report = run_evaluation(cfg, folder)
    say(f"{what}:\n{format_report(report)}")
    return report.summary


def run_grpo(cfg: Any, out: Path) -> dict[str, Any]:
    """`pipelines.grpo.train(cfg)` unless its exported policy exists; where its outputs are."""
    from pipelines.grpo import train

    policy = out / "grpo" / "policy_hf"
    if (policy / "config.json").exists():
        say(f"grpo: reusing {policy}")
        return {"policy": str(policy), "curves": str(out / "grpo" / "curves.png")}
    # an interrupted run resumes from its latest checkpoint (trainer.resume, trainer.save_every in the config)
    say(
        f"grpo: {cfg.trainer.steps} steps of {cfg.trainer.prompts_per_step} prompts x {cfg.rollout.n}, "
        f"lr {cfg.learner.lr:g}, KL {cfg.learner.loss.kl_coef:g} to the SFT policy"
    )
    result = train(cfg)
    say(f"grpo: {result['steps']} steps done (driver start-up {result['startup_seconds']:.0f} s)")
    return {"policy": str(result["policy"]), "curves": str(result["curves"])}


def grpo_trend(metrics_path: Path, window: int = 5) -> dict[str, Any]:
    """From the driver's metrics.jsonl: the first step's reward spread within groups, and the mean training
    reward (temperature-1 rollouts) of the first and last `window` steps, per part."""
    from veason_ray.cot.records import read_jsonl

    rows = list(read_jsonl(metrics_path))
    if not rows:
        return {}
    head, tail = rows[:window], rows[-window:]
    parts = ("total", "format", "keyframe", "spatial", "consistency", "parse_rate")

    def mean(block: list[dict[str, Any]], key: str) -> float | None:
        """The mean of `key` over the block; None when the run did not score it (a term with weight 0)."""
        values = [r[key] for r in block if key in r]
        return sum(values) / len(values) if values else None

    times = sorted(r["time/step_s"] for r in rows[1:] if "time/step_s" in r)  # step 1 warms up

    return {
        "steps": len(rows),
        "first_step": {
            "std_in_group": rows[0]["reward/std_in_group"],
            "zero_variance_groups": rows[0]["grpo/zero_variance_groups"],
            "groups": rows[0]["grpo/groups"],
        },
        "train_reward_first": {p: mean(head, f"reward/{p}") for p in parts},
        "train_reward_last": {p: mean(tail, f"reward/{p}") for p in parts},
        "kl_last": mean(tail, "learner/kl"),
        "step_seconds_median": times[len(times) // 2] if times else None,
        "reward_wait_seconds_mean": mean(rows[1:], "time/reward_wait_s"),
    }


def cell(summary: dict[str, Any] | None, path: tuple[str, ...], fmt: str) -> str:
    value: Any = summary
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return fmt.format(value) if isinstance(value, int | float) else "-"


def table(before: dict[str, Any] | None, after: dict[str, Any] | None) -> str:
    lines = ["| held-out valid split (greedy) | SFT (before GRPO) | after GRPO |", "|---|---|---|"]
    for name, path, fmt in TABLE_ROWS:
        lines.append(f"| {name} | {cell(before, path, fmt)} | {cell(after, path, fmt)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (kept between the two GPU calls)")
    parser.add_argument("--stage", choices=("sft", "grpo", "all"), default="all")
    parser.add_argument("--sft-dir", default="", help="a finished benchmarks/sft_format.py folder to reuse")
    parser.add_argument(
        "--steps", type=int, default=120, help="GRPO steps (H100: ~5 s each; a cut-short run resumes)"
    )
    parser.add_argument(
        "--prompts", type=int, default=8, help="prompts per GRPO step (x rollout.n responses)"
    )
    parser.add_argument(
        "--lr", type=float, default=1e-5, help="GRPO lr (paper: 1e-6 for a pretrained 3B; 3e-5 drifted here)"
    )
    parser.add_argument("--eval-expressions", type=int, default=64, help="valid-split expressions evaluated")
    parser.add_argument("--seed", type=int, default=0, help="run.seed: world, SFT, GRPO and evaluation picks")
    parser.add_argument("--tiny", action="store_true", help="CPU check: tiny sizes, a logical GPU")
    parser.add_argument("overrides", nargs="*", help="trailing key=value config overrides of the GRPO run")
    args = parser.parse_args(argv)
    if args.tiny:  # small defaults; values given on the command line still win
        parser.set_defaults(steps=3, prompts=2, eval_expressions=4)
        args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = read_json(out / RESULT_FILE) or {}
    result.update(args={k: v for k, v in vars(args).items() if k != "overrides"}, overrides=args.overrides)

    def save() -> None:
        (out / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")

    sft_dir = Path(args.sft_dir).resolve() if args.sft_dir else out / "sft_stage"
    if not (sft_dir / "sft" / "hf" / "config.json").exists():
        if args.sft_dir:
            raise SystemExit(f"grpo_learning: --sft-dir {sft_dir} has no sft/hf export")
        say(f"sft: benchmarks/sft_format.py into {sft_dir}")
        if sft_format.main(sft_arguments(args, sft_dir)) != 0:
            return 1
        import ray

        ray.shutdown()  # `veason sft` started Ray with its own resources; GRPO's placement starts it again
    sft = read_json(sft_dir / "sft_format.json") or {}
    result["sft"] = {k: sft.get(k) for k in ("records", "steps", "final_loss", "final_held_out_loss")}
    result["sft"].update(
        parse_rate_before=sft.get("before", {}).get("parse_rate"),
        parse_rate_after=sft.get("after", {}).get("parse_rate"),
    )
    save()

    cfg = grpo_config(args, sft_dir, out)
    result["before"] = evaluate_once(evaluation_config(cfg), out / "eval_before", "before GRPO")
    save()
    if args.stage == "sft":
        say(f"stage sft done; next: --stage grpo with the same --out ({out / RESULT_FILE})")
        return 0

    run = run_grpo(cfg, out)
    result["grpo"] = {**run, **grpo_trend(out / "grpo" / "metrics.jsonl")}
    if Path(run["curves"]).exists():
        shutil.copy(run["curves"], out / "curves.png")
    save()
    trained = evaluation_config(cfg)
    trained.model.policy = run["policy"]
    result["after"] = evaluate_once(trained, out / "eval_after", "after GRPO")
    result["seeds"] = {
        "run.seed": args.seed,
        "synthetic world": args.seed,
        "evaluation expressions": f"run.seed={args.seed} (select_expressions), answer seeds run.seed + index",
    }
    result["table"] = table(result["before"], result["after"])
    save()
    trend = result["grpo"]
    say(f"before / after GRPO ({args.eval_expressions} valid-split expressions, seed {args.seed}):")
    print(result["table"], flush=True)
    if trend:
        first, last = trend["train_reward_first"], trend["train_reward_last"]
        spread = trend["first_step"]
        moved = ", ".join(
            f"{part} {first[part]:.3f} -> {last[part]:.3f}"
            for part in ("total", "format", "keyframe", "spatial", "consistency")
            if first[part] is not None
        )
        say(
            f"training reward (temperature 1, mean of the first / last 5 of {trend['steps']} steps): {moved}, "
            f"parse {first['parse_rate']:.0%} -> {last['parse_rate']:.0%}; first step: reward std in group "
            f"{spread['std_in_group']:.3f}, {spread['zero_variance_groups']:.0f} of {spread['groups']:.0f} "
            f"groups with equal rewards; median step {trend['step_seconds_median'] or math.nan:.2f} s"
        )
        if spread["zero_variance_groups"] == spread["groups"]:
            say(
                "FLAT: every group of the first step has equal rewards (zero advantage): nothing to learn from"
            )
    say(f"curves {out / 'curves.png'}; results {out / RESULT_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
