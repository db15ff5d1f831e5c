"""An error raised inside a Ray actor reaches the user once: `veason` prints one line naming the actor's method
and the original message (Ray's chained RayTaskError unwrapped), `--verbose` gives the whole chain."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import ray

from pipelines.cli import describe_ray_error

REPO = Path(__file__).resolve().parents[1]


@ray.remote
class LearnerWorker:
    def setup(self) -> None:
        raise OSError("runs/x/policy: no weights in the folder")


@ray.remote
def start_pool() -> None:
    ray.get(LearnerWorker.remote().setup.remote())  # an actor's error, re-raised through a task


def test_an_actor_error_is_one_line_with_its_method_and_message(local_ray):
    with pytest.raises(ray.exceptions.RayTaskError) as raised:
        ray.get(start_pool.remote())
    line = describe_ray_error(raised.value)
    assert line is not None and "\n" not in line
    assert "LearnerWorker" in line and "setup" in line and "start_pool" in line
    assert line.endswith("OSError: runs/x/policy: no weights in the folder")
    assert describe_ray_error(ValueError("not from Ray")) is None


@pytest.mark.slow  # ~60 s: two programs each starting Ray (make test-slow)
def test_the_command_prints_the_line_and_verbose_the_chain(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text(
        textwrap.dedent("""
        import sys
        import ray
        from pipelines import cli

        @ray.remote
        class LearnerWorker:
            def setup(self):
                raise OSError("no weights in the folder")

        def run(args):
            ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
            actor = LearnerWorker.remote()
            return ray.get(actor.setup.remote())

        cli.SUBCOMMANDS["config"] = ("fails", "a program whose actor fails")
        sys.modules["fails"] = sys.modules["__main__"]
        sys.modules["fails"].add_arguments = lambda parser: None
        raise SystemExit(cli.main(sys.argv[1:]))
    """)
    )
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": f"{REPO}:{tmp_path}"}
    quiet = subprocess.run([sys.executable, str(script), "config"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert quiet.returncode == 1
    assert (
        "veason config: LearnerWorker" in quiet.stderr and "OSError: no weights in the folder" in quiet.stderr
    )
    assert "Traceback" not in quiet.stderr, quiet.stderr[-3000:]
    loud = subprocess.run([sys.executable, str(script), "config", "--verbose"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "RayTaskError" in loud.stderr
