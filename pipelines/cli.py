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
--verbose (anywhere)                     the libraries' output on the console (not only in the run's log file)
                                         and whole errors (Ray's chains, tracebacks), not one line
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import traceback

from pipelines.console import close_console, current_console, say

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


def describe_ray_error(error: BaseException) -> str | None:
    """One line for an error raised inside a Ray task or actor: where it happened (the actor and method) and the
    original message, unwrapped from Ray's chained `RayTaskError`s; None for any other error."""
    from ray.exceptions import RayActorError, RayTaskError

    if isinstance(error, RayActorError):
        full = str(getattr(error, "error_msg", "") or error)
        text = full.strip().splitlines()
        actor = re.search(r"class_name: (\w+)", full)
        pid = re.search(r"\bpid: (\d+)", full)
        who = f"{actor.group(1)}{f' (pid {pid.group(1)})' if pid else ''}: " if actor else ""
        return f"a Ray actor died: {who}{text[0] if text else type(error).__name__}"
    if not isinstance(error, RayTaskError):
        return None
    # "ray::LearnerWorker.setup() (pid=..., ip=...)" heads each level of Ray's message, outermost first
    where = re.findall(r"ray::([\w.]+)\(", str(error))
    while isinstance(error, RayTaskError):
        cause = getattr(error, "cause", None)
        if cause is None or cause is error:
            break
        error = cause
    message = str(error).strip().splitlines()
    origin = " <- ".join(dict.fromkeys(w for w in where if w))
    return f"{origin}: {type(error).__name__}: {message[0] if message else ''}".strip()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv  # anywhere: Ray's full error chains instead of one line each
    argv = [a for a in argv if a != "--verbose"]
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
    args.verbose = verbose  # config_from_args sets run.verbose from it
    try:
        return int(args._run(args) or 0)
    except Exception as error:
        line = failure_line(args.command, error, verbose)
        if line is None:
            raise
        say(line, err=True)
        return 1
    finally:
        close_console()


def failure_line(command: str, error: Exception, verbose: bool) -> str | None:
    """The console's one line for the error that ended `command`, or None where the whole error is shown (with
    --verbose, and for an error outside Ray when no log file takes it). With a log file, the whole error is
    written there and the line names the file."""
    console = current_console()
    logged = console is not None and console.log is not None
    if verbose or (console is not None and console.verbose):
        return None
    line = describe_ray_error(error) if "ray" in sys.modules else None
    if not logged:
        return line and f"veason {command}: {line} (--verbose shows Ray's whole error)"
    traceback.print_exception(type(error), error, error.__traceback__, file=console.log)
    text = str(error).strip().splitlines()
    line = line or f"{type(error).__name__}: {text[0] if text else ''}".strip()
    return f"veason {command}: {line} (the whole error: {console.log_path}; --verbose shows it here)"


if __name__ == "__main__":
    raise SystemExit(main())
