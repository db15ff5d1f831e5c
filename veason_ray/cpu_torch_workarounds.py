"""CPU-only environment workarounds, kept in this one place.

PyPI serves only CUDA-linked torchvision wheels for Linux. Next to the CPU torch build, torchvision's compiled
extension (`torchvision/_C`) cannot load (it links libc10_cuda.so), and `import torchvision` then dies with
`operator torchvision::nms does not exist`, because its meta registrations for `nms` / `qnms` are unconditional.
That breaks transformers' image processors, vLLM's Qwen2-VL code and SAM2 on CPU machines.

Declaring the two operator schemas before torchvision is imported lets the import and all pure-PyTorch parts
work (calling a compiled op such as nms still fails). Nothing here runs on a CUDA build of torch, nor when
torchvision's extension loads by itself (a matching CPU torchvision build), so GPU setups are never touched.

vLLM's CPU worker replaces `torch.set_num_threads` in its process with a stub that warns at each call ("CPU
backend doesn't allow to use `torch.set_num_threads` after the thread binding, skip it."); with the engine core
in the caller's process, vLLM's own multimodal processor then calls it twice per request. Without a thread
binding (VLLM_CPU_OMP_THREADS_BIND=nobind, our CPU setting) the stub guards nothing: `torch_threads_settable`
puts torch's function back right after the worker has replaced it.

DeepSpeed's CPU accelerator compiles its shared-memory collective (`deepspeed_shm_comm`, ~40 s of C++ on a machine
without a cached build) whenever `deepspeed.init_distributed` makes its backend, for `inference_all_reduce` alone,
which training never calls: `skip_deepspeed_shm_build` marks it unavailable on CPU torch.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# torchvision's own schemas (torchvision/csrc/ops/nms.cpp, quantized/cpu/qnms_kernel.cpp).
_TORCHVISION_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

# The Library must stay alive: dropping it removes the definitions it made.
_torchvision_library: torch.library.Library | None = None


def _torchvision_op_exists(name: str) -> bool:
    import torch

    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _torchvision_extension_loads(package_dir: Path) -> bool:
    """Load torchvision's compiled ops the way torchvision itself does; False where they cannot load here."""
    import torch

    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = package_dir / f"_C{suffix}"
        if candidate.is_file():
            try:
                torch.ops.load_library(str(candidate))
            except (ImportError, OSError):
                return False
            return True
    return False


def apply_cpu_workarounds() -> bool:
    """Make `import torchvision` work next to a CPU-only torch. Idempotent and cheap to call again.

    Returns True when the torchvision operator schemas are declared by this module (now or earlier), False
    when nothing was needed: a CUDA torch, torchvision absent, or its operators already defined or loadable.
    Safe while torchvision is being imported (torch's entry point runs before torchvision registers ops)."""
    global _torchvision_library
    # torch is imported here, not at module level, so that this function can also serve as torch's
    # "torch.backends" entry point (run at the end of `import torch`, in every process). When that entry
    # point is installed, this first `import torch` may itself have applied the workaround.
    import torch

    if _torchvision_library is not None:
        return True
    if torch.version.cuda is not None:
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    if all(_torchvision_op_exists(name) for name in _TORCHVISION_SCHEMAS):
        return False
    if _torchvision_extension_loads(Path(next(iter(spec.submodule_search_locations)))):
        return False
    library = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in _TORCHVISION_SCHEMAS.items():
        if not _torchvision_op_exists(name):
            library.define(schema)
    _torchvision_library = library
    return True


@contextlib.contextmanager
def torch_threads_settable() -> Iterator[None]:
    """Around building a vLLM engine: where no thread is bound (VLLM_CPU_OMP_THREADS_BIND=nobind), the CPU worker
    built in this process gets torch's `set_num_threads` back right after its `init_device` put the stub in (the
    next thing it calls is `init_worker_distributed_environment`; its model runner then sets threads twice);
    elsewhere (GPUs, bound threads) nothing changes."""
    if os.environ.get("VLLM_CPU_OMP_THREADS_BIND") != "nobind":
        yield
        return
    import torch
    from vllm.v1.worker import cpu_worker

    setter, init_distributed = torch.set_num_threads, cpu_worker.init_worker_distributed_environment

    def init_distributed_with_setter(*args: Any, **kwargs: Any) -> Any:
        torch.set_num_threads = setter
        return init_distributed(*args, **kwargs)

    cpu_worker.init_worker_distributed_environment = init_distributed_with_setter
    try:
        yield
    finally:
        cpu_worker.init_worker_distributed_environment = init_distributed
        torch.set_num_threads = setter


def skip_deepspeed_shm_build() -> None:
    """Before `deepspeed.init_distributed`: on a CPU accelerator, DeepSpeed skips building its shared-memory
    collective (only its `inference_all_reduce` uses it; all_reduce and the rest go through torch.distributed);
    on a GPU nothing changes."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
