"""The `veason` command: one subcommand per program, each imported only when it runs.

veason synth --out data/revos            write the synthetic world (ReVOS layout)
veason tiny-models --out models          write the tiny random-init Qwen2.5-VL and SAM2
veason config [CONFIG] [key=value ...]   print the resolved configuration
veason demo [CONFIG] [key=value ...]     the embedded default, end to end on a local Ray cluster
veason grpo CONFIG [key=value ...]       GRPO training (the main job; `ray job submit -- veason grpo ...`)
veason infer CONFIG input=V query="..."  segment one video (an .mp4, a JPEG folder, or s3://)
veason eval CONFIG [key=value ...]       evaluate a policy on a benchmark split (J, F, J&F, R)
veason compare RUN_A RUN_B               compare two evaluation runs
veason serve CONFIG [key=value ...]      the model behind an HTTP endpoint (Ray Serve) and a page to try it
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module with add_arguments(parser) and run(args) -> int, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("veason_ray.synth.cli", "write the synthetic world in the ReVOS (or ReasonVOS) layout"),
    "tiny-models": ("veason_ray.models.cli", "write tiny random-init Qwen2.5-VL and SAM2 checkpoints"),
    "config": ("pipelines.config_command", "print the resolved configuration (defaults < YAML < overrides)"),
    "demo": ("pipelines.demo", "run the embedded default end to end on a local Ray cluster"),
    "grpo": ("pipelines.grpo", "GRPO training: rollout, SAM2 reward and learner pools on Ray (the main job)"),
    "sample": ("pipelines.sample", "write a stratified subset of the training expressions (CoT data)"),
    "cot": ("pipelines.cot", "generate chain-of-thought SFT records with a teacher VLM (or offline)"),
    "sft": ("pipelines.sft", "CoT-SFT of the policy on Ray Train + DeepSpeed; exports the HF folder"),
    "infer": ("pipelines.infer", 'segment one video: input=VIDEO query="..." -> masks, RLE, overlay video'),
    "eval": ("pipelines.evaluate", "evaluate a policy on a benchmark split (Ray Data job, resumable)"),
    "compare": ("pipelines.eval_compare", "compare two evaluation runs: a table per subset and a chart"),
    "serve": ("pipelines.serve_command", "serve the model over HTTP (Ray Serve): /v1 API and a page at /"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="veason", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen subcommand's module is imported, so `veason --help` never loads torch or ray.
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(sub_parser)
            sub_parser.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
