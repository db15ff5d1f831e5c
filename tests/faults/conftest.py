"""The uninterrupted run every fault is compared with (once per session)."""

from __future__ import annotations

import pytest
from grpo_runs import FaultRun, RunOutcome, grpo_command


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, synthetic_revos, tiny_models) -> RunOutcome:
    out = tmp_path_factory.mktemp("reference") / "run"
    run = FaultRun(grpo_command(out, synthetic_revos, tiny_models), out.parent / "run.log").start()
    assert run.finish() == 0, run.output[-3000:]
    return RunOutcome.read(out)
