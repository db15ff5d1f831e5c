"""What a training run shows and keeps: one summary line per step, metrics as JSONL and to wandb (offline by
default, online when the user sets `trainer.wandb.mode=online` and a key), reward curves as PNG at the end,
and sampled responses drawn on their frames every `trainer.sample_images_every` steps.

Files under `<run.output_dir>/`: metrics.jsonl (one object per step, appended, so a resumed run continues
it), curves.png, samples/step_<N>_group_<G>_{best,worst,all_tied}.png (and .txt), wandb/ (the offline run,
`wandb sync` uploads it).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from veason_ray.answer_parsing import ParsedAnswer, parse_answer
from veason_ray.config import VeasonConfig
from veason_ray.records import PromptGroup, Scored
from veason_ray.visualize import (
    BOX_COLOUR,
    GT_COLOUR,
    Caption,
    ground_truth_keyframe,
    sampled_frames_strip,
    save_png,
)

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"  # one JSON line per step, in the run's folder
SFT_SUMMARY_FILE = "sft_summary.json"  # `veason sft`'s before/after scores and losses, in sft.output_dir
SFT_CURVE_FILE = "loss_curve.png"  # `veason sft`'s loss curve, beside it
WANDB_ID_FILE = "wandb_run_id"  # the wandb run a resumed run continues

SUMMARY_KEYS = (
    ("reward/total", "R", "{:.3f}"),
    ("reward/format", "fmt", "{:.2f}"),
    ("reward/keyframe", "key", "{:.2f}"),
    ("reward/spatial", "iou", "{:.2f}"),
    ("reward/consistency", "cons", "{:.2f}"),
    ("reward/accuracy", "acc", "{:.2f}"),
    ("response/length_mean", "len", "{:.0f}"),
    ("learner/kl", "kl", "{:.4f}"),
    ("time/step_s", "step", "{:.1f}s"),
    ("time/generate_s", "gen", "{:.1f}s"),
    ("time/reward_wait_s", "rwd", "{:.1f}s"),
    ("time/update_s", "upd", "{:.1f}s"),
    ("time/sync_s", "sync", "{:.2f}s"),
    ("throughput/tokens_per_s_per_gpu", "tok/s/gpu", "{:.0f}"),
    ("weights/staleness_max", "stale", "{:.0f}"),
)
CURVES = (
    "reward/total",
    "reward/format",
    "reward/keyframe",
    "reward/spatial",
    "reward/consistency",
    "learner/kl",
)


def summary_line(step: int, total: int, metrics: dict[str, float]) -> str:
    parts = [f"step {step}/{total}"]
    parts += [f"{name} {fmt.format(metrics[key])}" for key, name, fmt in SUMMARY_KEYS if key in metrics]
    return " | ".join(parts)


class RunLog:
    """Metrics of one run (and its resumptions) in `output_dir`."""

    def __init__(self, cfg: VeasonConfig, output_dir: str | Path, resumed_at: int = 0) -> None:
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / METRICS_FILE
        self._drop_after(resumed_at)
        self.wandb = _start_wandb(cfg, self.dir)

    def _drop_after(self, step: int) -> None:
        """Steps past the checkpoint a resumed run restarts from were lost with the run: keep earlier ones."""
        if not self.path.exists():
            return
        kept = [
            line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def history(self) -> list[dict[str, float]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]

    def finish(self) -> Path | None:
        """Write curves.png (reward parts and KL per step) and close wandb; returns the PNG's path."""
        png = write_curves(self.history(), self.dir / "curves.png")
        if self.wandb is not None:
            self.wandb.finish()
        return png


def _start_wandb(cfg: VeasonConfig, out: Path) -> Any:
    settings = cfg.trainer.wandb
    if settings.mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:  # pragma: no cover - wandb is a dependency; a broken install only loses the mirror
        log.warning("wandb is not importable; metrics go to metrics.jsonl only")
        return None
    id_file = out / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return wandb.init(
        project=settings.project,
        entity=settings.entity or None,
        name=cfg.run.name,
        id=run_id,
        resume="allow",
        mode=settings.mode,
        dir=str(out),
        config={"veason": cfg.run.name},
    )


def write_curves(history: Sequence[dict[str, float]], path: Path) -> Path | None:
    """One panel per curve in CURVES over the steps; None when there is nothing to draw."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in CURVES if any(k in h for h in history)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), squeeze=False)
    steps = [h["step"] for h in history]
    for ax, key in zip(axes[0], keys, strict=True):
        ax.plot(steps, [h.get(key, np.nan) for h in history], marker="o", markersize=2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_response(frames: np.ndarray, group: PromptGroup, scored: Scored, rank: str = "") -> np.ndarray:
    """The sampled frames side by side (`sampled_frames_strip`): GT boxes in magenta on every frame, the
    response's boxes in yellow on the keyframe it chose, and below them the question, the legend and the
    reward parts, after ``rank`` (e.g. "best of 8")."""
    sample = group.sample
    parsed = parse_answer(scored.rollout.text)
    answered = isinstance(parsed, ParsedAnswer)
    if answered:
        answer = f"answer: keyframe {parsed.keyframe}s, {len(parsed.boxes)} box(es)"
    else:
        answer = f"answer: none (does not parse: {parsed.reason.value})"
    gt_keyframe = ground_truth_keyframe(sample.gt_masks_560, sample.frame_indices)
    truth = "no target" if gt_keyframe is None else f"boxes on every frame, keyframe {gt_keyframe}s"
    r = scored.reward
    scores = (
        f"reward {r.total:.2f} (" + ", ".join(f"{name} {value:.2f}" for name, value in r.parts.items()) + ")"
    )
    caption = Caption(
        sample.record.expression,
        ((BOX_COLOUR, answer), (GT_COLOUR, f"ground truth: {truth}")),
        f"{rank}: {scores}" if rank else scores,
    )
    return sampled_frames_strip(
        frames,
        sample.frame_indices,
        parsed.keyframe if answered else None,
        parsed.boxes if answered else None,
        gt_boxes_560=sample.gt_boxes_560,
        band=caption,
    )


def save_samples(
    step: int, groups: Sequence[PromptGroup], scored: dict[int, list[Scored]], out: Path, get: Any
) -> int:
    """The best and the worst response of up to two groups, drawn to `out/samples/` with their text beside
    them (step_<N>_group_<G>_best.png / _worst.png, .txt); a group whose responses all have the same reward
    gets one picture, step_<N>_group_<G>_all_tied.png. Returns the pictures saved."""
    saved = 0
    for group in list(groups)[:2]:
        rows = sorted(scored[group.group_id], key=lambda s: s.reward.total)
        frames = group.sample.resolve_frames(get)
        count = len(rows)
        if rows[0].reward.total == rows[-1].reward.total:
            chosen = [("all_tied", f"all {count} responses tied", rows[0])]
        else:
            chosen = [("best", f"best of {count}", rows[-1]), ("worst", f"worst of {count}", rows[0])]
        for tag, rank, row in chosen:
            name = out / "samples" / f"step_{step:06d}_group_{group.group_id}_{tag}"
            save_png(draw_response(frames, group, row, rank), name.with_suffix(".png"))
            name.with_suffix(".txt").write_text(row.rollout.text)
            saved += 1
    return saved
