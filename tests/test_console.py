"""The console of a `veason` command (`pipelines/console.py`): our lines on the terminal, third-party output in
`<run.output_dir>/logs/veason-<command>.log`, all of it on the terminal with `--verbose`.

Third-party output, as the console must not show it: a logging record (`INFO`, `WARNING`, ... as a word), a
line Ray forwards from a worker (`(Name pid=N)`), wandb's `wandb:` lines, a Python warning (`...Warning:`), a
torch C++ warning (`[W1206 ...`), a timestamped library line (`[2026-12-06 ...`, `2026-12-06 ...`) and colour
codes. A fake command (`NOISY`) makes each kind of it next to our lines; `veason infer` and `veason eval` on
the tiny policy and the synthetic world are the real ones (eval, with Ray workers, is slow-marked).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipelines import console
from veason_ray.config_loading import load_config

REPO = Path(__file__).resolve().parents[1]
ENV = {
    **{k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1",
}  # fmt: skip
THIRD_PARTY = re.compile(
    r"\b(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b"  # a logging record: vLLM, Ray, Ray Data, transformers ...
    r"|\(\S[^)]* pid=\d+"  # a worker line Ray forwards to the driver
    r"|^wandb:"
    r"|\w+Warning: "  # a Python warning
    r"|^\[W\d{4} "  # a torch C++ warning
    r"|^\[?\d{4}-\d\d-\d\d[ T]"  # a timestamped library line (Ray, DeepSpeed)
    r"|\x1b\["  # a colour code (Ray's prefixes)
)

# A command that writes every kind of output, next to ours (`veason noisy`, registered like a subcommand).
NOISY = textwrap.dedent('''
    import logging, os, subprocess, sys, warnings

    from pipelines import cli
    from pipelines.config_command import add_config_arguments, config_from_args
    from pipelines.console import console_stream, open_console, say


    def add_arguments(parser):
        add_config_arguments(parser)


    def run(args):
        cfg = config_from_args(args, "noisy")
        open_console(cfg, "noisy")
        say("our line")
        print("a library's print")
        logging.getLogger("somelib").warning("a library's warning")
        warnings.warn("a python warning", stacklevel=1)
        os.write(1, b"a C-level write to fd 1\\n")
        os.write(2, b"a C-level write to fd 2\\n")
        subprocess.run(["echo", "a child process"], check=True)
        forward_worker_lines()
        from tqdm import tqdm

        stream = console_stream()
        with tqdm(total=2, desc="noisy", file=stream) as bar:
            for step in (1, 2):
                bar.update(1)
                bar.write(f"step {step}/2 | R 0.500", file=stream)
        if os.environ.get("NOISY_FAILS"):
            raise ValueError("the noisy command failed\\nits second line")
        say("our last line")
        return 0


    def forward_worker_lines():
        """What Ray's driver does with the lines its workers print (ray/_private/worker.py)."""
        from ray._private.worker import print_to_stdstream

        lines = ["INFO 12-06 08:20:10 [core.py:1] a vLLM line in an actor", "[veason] sft step 1/4: ours, in an actor"]
        data = {"pid": 4242, "actor_name": "RolloutEngine", "ip": "10.0.0.1", "localhost": "10.0.0.1", "job": "",
                "is_err": True, "lines": lines}
        print_to_stdstream(data, ignore_prefix=False)


    cli.SUBCOMMANDS["noisy"] = ("noisy", "a command that prints everywhere")
    sys.modules["noisy"] = sys.modules["__main__"]
    raise SystemExit(cli.main(sys.argv[1:]))
''')
THEIRS = [
    "a library's print",
    "a library's warning",
    "UserWarning: a python warning",
    "a C-level write to fd 1",
    "a C-level write to fd 2",
    "a child process",
    "(RolloutEngine pid=4242) INFO 12-06 08:20:10 [core.py:1] a vLLM line in an actor",
]


def _noisy(tmp_path: Path, *extra: str, fails: bool = False) -> subprocess.CompletedProcess:
    script = tmp_path / "noisy.py"
    script.write_text(NOISY)
    env = {**ENV, "PYTHONPATH": str(REPO), **({"NOISY_FAILS": "1"} if fails else {})}
    command = [sys.executable, str(script), "noisy", f"run.output_dir={tmp_path / 'run'}", *extra]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, timeout=120)
    # decoded here: text=True would turn the bar's carriage returns into line feeds
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


def _lines(text: str) -> list[str]:
    """What a terminal ends up showing, bar frames included: the pieces between line feeds and returns."""
    return [piece.strip() for piece in re.split(r"[\r\n]", text) if piece.strip()]


def test_our_lines_on_the_console_and_the_rest_in_the_log_file(tmp_path):
    done = _noisy(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    log = tmp_path / "run" / "logs" / "veason-noisy.log"
    ours = [line for line in _lines(done.stdout) if not line.startswith("noisy:")]  # the bar's frames
    assert ours == [
        f"veason noisy: the libraries' output goes to {log} (--verbose shows it here)",
        "our line",
        "sft step 1/4: ours, in an actor",
        "step 1/2 | R 0.500",
        "step 2/2 | R 0.500",
        "our last line",
    ]
    assert done.stderr == ""
    # a step line starts where the bar was cleared, not glued to its end
    for line in done.stdout.split("\n"):
        if "| R 0.500" in line:
            assert line.split("\r")[-1].startswith("step "), repr(line)
    text = log.read_text()
    assert all(theirs in text for theirs in THEIRS), text
    assert "our line" not in text and "[veason]" not in text and "\x1b[" not in text


def test_verbose_keeps_the_third_party_output_on_the_console(tmp_path):
    done = _noisy(tmp_path, "--verbose")
    assert done.returncode == 0, done.stdout + done.stderr
    shown = done.stdout + done.stderr
    assert all(theirs in shown for theirs in THEIRS[:-1]), shown
    assert "RolloutEngine pid=4242)" in shown and "a vLLM line in an actor" in shown
    assert "sft step 1/4: ours, in an actor" in done.stdout and "[veason]" not in shown
    assert not (tmp_path / "run" / "logs").exists()


def test_an_error_is_one_line_on_the_console_and_whole_in_the_log(tmp_path):
    done = _noisy(tmp_path, fails=True)
    log = tmp_path / "run" / "logs" / "veason-noisy.log"
    assert done.returncode == 1
    assert done.stderr == (
        f"veason noisy: ValueError: the noisy command failed (the whole error: {log}; --verbose shows it here)\n"
    )
    assert "Traceback" in log.read_text() and "its second line" in log.read_text()
    loud = _noisy(tmp_path, "run.verbose=true", fails=True)  # the config key, as --verbose sets it
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "a C-level write to fd 2" in loud.stderr


def test_the_log_of_a_run_in_object_storage_is_on_this_machine():
    cfg = load_config(None, ["run.output_dir=s3://bucket/runs/a"])
    path = console.log_path(cfg, "grpo")
    assert path.name == "veason-grpo.log" and path.parent.parent.name == console.S3_LOGS_ROOT
    assert path != console.log_path(load_config(None, ["run.output_dir=s3://bucket/runs/b"]), "grpo")
    assert console.log_path(load_config(None, ["run.output_dir=/tmp/r"]), "eval") == Path(
        "/tmp/r/logs/veason-eval.log"
    )


def test_a_ray_worker_marks_its_lines_for_the_drivers_console(monkeypatch, capsys):
    monkeypatch.setattr(console, "_in_ray_worker", lambda: True)
    console.say("sft step 1/4\n  held-out loss 0.5")
    assert (
        capsys.readouterr().out
        == f"{console.WORKER_MARK}sft step 1/4\n{console.WORKER_MARK}  held-out loss 0.5\n"
    )


def _third_party(lines: list[str]) -> list[str]:
    return [line for line in lines if THIRD_PARTY.search(line)]


def _veason(tmp_path: Path, command: str, *overrides: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`veason COMMAND tests/configs/small.yaml` with the tiny random policy and the colour tracker, writing under
    tmp_path/run; the process and what it printed, as lines."""
    from veason_ray.models.tiny_qwen import write_tiny_qwen

    policy = tmp_path / "qwen2_5_vl_tiny"
    if not policy.exists():
        write_tiny_qwen(policy, seed=0)
    argv = [
        sys.executable, "-m", "pipelines.cli", command, "tests/configs/small.yaml", f"run.output_dir={tmp_path / 'run'}",
        f"model.policy={policy}", "reward.propagator=colour", *overrides,
    ]  # fmt: skip
    done = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done, _lines(done.stdout + done.stderr)


@pytest.mark.slow  # ~30 s; the default suite checks the console of a whole `veason demo` (tests/test_demo.py)
def test_veason_infer_shows_only_our_lines(tmp_path, synthetic_revos):
    """vLLM in the driver's own process: its records, C++ warnings and progress bars go to the log file, and
    vLLM's CPU worker no longer warns about `torch.set_num_threads` (`torch_threads_settable`)."""
    video = next(
        p for p in (synthetic_revos / "JPEGImages").rglob("*") if p.is_dir() and any(p.glob("*.jpg"))
    )
    done, lines = _veason(
        tmp_path, "infer", f"input={video}", "query=the shape", "data.eval_num_frames=4",
        "inference.generator=vllm", "inference.max_new_tokens=32",
    )  # fmt: skip
    assert "query: the shape" in lines and any(line.startswith("stages: ") for line in lines)
    assert _third_party(lines) == [] and done.stderr == ""
    text = (tmp_path / "run" / "logs" / "veason-infer.log").read_text()
    assert re.search(r"INFO .*\[core\.py:\d+\] Initializing a V1 LLM engine", text), text[-3000:]
    assert "set_num_threads" not in text


@pytest.mark.slow  # ~1.5 min: two evaluations, each starting Ray and a vLLM engine in a Ray Data actor
def test_veason_eval_shows_only_our_lines_and_verbose_all(tmp_path, synthetic_revos):
    overrides = [
        f"data.root={synthetic_revos}",
        "eval.max_expressions=2",
        "eval.worst_overlays=0",
        "placement.num_cpus=4",
    ]
    _, lines = _veason(tmp_path, "eval", *overrides)
    assert any(line.startswith("evaluating 2 expressions") for line in lines)
    assert {"overall", "results"} <= {line.split()[0] for line in lines}
    assert _third_party(lines) == []
    text = (tmp_path / "run" / "logs" / "veason-eval.log").read_text()
    assert "Started a local Ray instance" in text
    assert re.search(r"^\(MapWorker\(MapBatches\(\w+\)\) pid=\d+\)", text, re.M)
    assert "set_num_threads" not in text

    _, shown = _veason(tmp_path, "eval", *overrides, f"eval.output_dir={tmp_path / 'loud'}", "--verbose")
    assert any("pid=" in line for line in _third_party(shown)) and any("INFO" in line for line in shown)
