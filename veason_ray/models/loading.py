"""Loading model checkpoints by spec: the one code path for real checkpoints and the tiny test models.

A spec names where a checkpoint lives:
- a local folder (or, for SAM2, a local .pt file);
- ``s3://bucket/prefix``: copied once into a local cache folder keyed by the URI, through the object store;
- a Hugging Face hub id such as ``Qwen/Qwen2.5-VL-3B-Instruct`` (fetched into the Hugging Face cache; only
  for users with network: tests run with ``HF_HUB_OFFLINE=1``);
- for SAM2 also an http(s) download URL (copied once into the cache).

The cache folder is ``cache_dir`` when given, else ``$VEASON_MODEL_CACHE``, else
``~/.cache/veason_ray/models``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from veason_ray.config import StorageConfig
from veason_ray.cpu_torch_workarounds import apply_cpu_workarounds
from veason_ray.models.specs import HUB_ID
from veason_ray.object_store import is_s3_uri, store_for

apply_cpu_workarounds()

import torch  # noqa: E402

if TYPE_CHECKING:
    from sam2.sam2_video_predictor import SAM2VideoPredictor

_COMPLETE_SUFFIX = ".complete.json"  # marker beside a cached copy: written once its download finished
# Hydra's configuration state is process-global; SAM2 builds must not interleave.
_SAM2_BUILD_LOCK = threading.Lock()


def default_cache_dir() -> Path:
    """Where copies of remote checkpoints go when no cache_dir is given."""
    return Path(os.environ.get("VEASON_MODEL_CACHE") or Path.home() / ".cache" / "veason_ray" / "models")


def _is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def _cache_entry(uri: str, cache_dir: str | Path | None) -> Path:
    """The cache folder of one remote URI: a readable tail of the URI plus a hash of all of it."""
    tail = re.sub(r"[^\w.-]+", "_", uri.rstrip("/").rsplit("/", 1)[-1])[:64] or "root"
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return Path(cache_dir or default_cache_dir()) / f"{tail}-{digest}"


def _fetch_once(uri: str, storage: StorageConfig | None, cache_dir: str | Path | None) -> Path:
    """Copy the file or folder at an s3:// or http(s) URI into the cache (once) and return the local copy's
    folder. A file lands in that folder under its own name. Once per node: processes resolving the same URI at
    the same time (a node's learner rank and engines) wait on a file lock for the first one's copy."""
    local_dir = _cache_entry(uri, cache_dir)
    marker = local_dir.with_name(local_dir.name + _COMPLETE_SUFFIX)
    if marker.is_file() and local_dir.is_dir():
        return local_dir
    local_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(local_dir.with_name(local_dir.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if marker.is_file() and local_dir.is_dir():
            return local_dir  # another process copied it while this one waited
        return _fetch(uri, storage, local_dir, marker)


def _fetch(uri: str, storage: StorageConfig | None, local_dir: Path, marker: Path) -> Path:
    """The copy itself, under `_fetch_once`'s lock; the marker that makes it complete is written last."""
    if _is_url(uri):
        local_dir.mkdir(parents=True, exist_ok=True)
        name = uri.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        partial = local_dir / f".{name}.partial"
        try:
            torch.hub.download_url_to_file(uri, str(partial), progress=False)
        except Exception as e:
            raise OSError(f"{uri}: download failed: {e}") from e
        partial.replace(local_dir / name)
    else:
        try:
            store_for(uri, storage).download_tree(uri, local_dir)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"model spec {uri!r}: nothing to download ({e})") from None
    tmp_marker = marker.with_name(f".{marker.name}.{os.getpid()}")
    tmp_marker.write_text(json.dumps({"uri": uri}) + "\n")
    tmp_marker.replace(marker)
    return local_dir


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id))
    except Exception as e:
        raise OSError(
            f"model spec {repo_id!r}: no local folder of that name, and getting it from the Hugging Face hub "
            f"failed ({type(e).__name__}: {e})"
        ) from e


def portable_model_spec(spec: str) -> str:
    """`spec` as another process on this or another node should resolve it: an existing local folder as its
    absolute path (actors do not share the driver's working folder), an s3:// URI or hub id unchanged (each node
    fetches its own copy once)."""
    path = Path(str(spec)).expanduser()
    return str(path.resolve()) if not is_s3_uri(str(spec)) and path.is_dir() else str(spec)


def resolve_model_dir(spec: str, storage: StorageConfig | None = None, cache_dir: str | None = None) -> Path:
    """The local folder holding the checkpoint named by `spec`: a local folder is itself; an s3:// prefix is
    downloaded once into the cache; a hub id goes through `huggingface_hub.snapshot_download`."""
    spec = str(spec)
    if is_s3_uri(spec):
        return _fetch_once(spec, storage, cache_dir)
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"model spec {spec!r}: is a file; expected a checkpoint folder")
    if HUB_ID.match(spec):
        return _hub_snapshot(spec)
    raise FileNotFoundError(
        f"model spec {spec!r}: not a local folder, an s3:// URI or a Hugging Face hub id (owner/name)"
    )


def checkpoint_version(model_dir: str | Path) -> str:
    """A short digest naming a checkpoint folder's contents: its config.json and the names and sizes of its
    weight files (read in milliseconds, not by hashing gigabytes of weights)."""
    folder = Path(model_dir)
    digest = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for path in sorted(folder.glob("*")):
        if path.suffix in (".safetensors", ".bin", ".pt") and path.is_file():
            digest.update(f"{path.name}:{path.stat().st_size};".encode())
    return digest.hexdigest()[:12]


def load_policy(
    spec: str,
    *,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    storage: StorageConfig | None = None,
    cache_dir: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> tuple[Any, Any]:
    """The Qwen2.5-VL policy named by `spec` and its processor, as `(model, processor)`; the model in eval mode
    on `device`. `dtype="auto"` keeps the checkpoint's dtype. `min_pixels` / `max_pixels` override the image
    processor's pixel limits (None keeps the checkpoint's)."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from veason_ray.models.vision_window_attention import batch_vision_windows

    model_dir = resolve_model_dir(spec, storage, cache_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"model spec {spec!r}: no config.json in {model_dir}")
    model_type = json.loads(config_path.read_text()).get("model_type")
    if model_type != "qwen2_5_vl":
        raise ValueError(
            f"model spec {spec!r}: model_type is {model_type!r} in {config_path}, not 'qwen2_5_vl'"
        )
    pixel_limits = {
        k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None
    }
    try:
        processor = AutoProcessor.from_pretrained(model_dir, **pixel_limits)
    except OSError as e:
        raise OSError(f"model spec {spec!r}: cannot load the processor from {model_dir}: {e}") from e
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        model_dir, dtype=dtype, attn_implementation=attn_implementation, device_map=str(device)
    )
    batch_vision_windows(model)
    return model.eval(), processor


def _sam2_hub_files() -> dict[str, tuple[str, str]]:
    from sam2.build_sam import HF_MODEL_ID_TO_FILENAMES

    return HF_MODEL_ID_TO_FILENAMES


def _single(folder: Path, pattern: str, spec: str) -> Path | None:
    found = sorted(folder.glob(pattern))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ValueError(f"SAM2 spec {spec!r}: several {pattern} files in {folder} ({names}); name one")
    return found[0] if found else None


def resolve_sam2_checkpoint(
    spec: str, storage: StorageConfig | None = None, cache_dir: str | None = None
) -> tuple[Path, str | None]:
    """`(local .pt path, config found beside it or None)` for a SAM2 checkpoint spec: a .pt file or a folder
    holding one (locally, on s3:// or at an http(s) URL), or a SAM2 hub id such as
    `facebook/sam2.1-hiera-large`. A folder's single *.yaml is its config; a hub id's config is sam2's
    packaged one."""
    spec = str(spec)
    if is_s3_uri(spec) or _is_url(spec):
        path = _fetch_once(spec, storage, cache_dir)
    elif spec in _sam2_hub_files():
        from huggingface_hub import hf_hub_download

        config_name, filename = _sam2_hub_files()[spec]
        try:
            return Path(hf_hub_download(repo_id=spec, filename=filename)), config_name
        except Exception as e:
            raise OSError(
                f"SAM2 spec {spec!r}: getting {filename} from the Hugging Face hub failed: {e}"
            ) from e
    else:
        path = Path(spec).expanduser()
        if path.is_file():
            return path, None
        if not path.is_dir():
            raise FileNotFoundError(f"SAM2 spec {spec!r}: no such file or folder")
    checkpoint = _single(path, "*.pt", spec)
    if checkpoint is None:
        raise FileNotFoundError(f"SAM2 spec {spec!r}: no .pt checkpoint in {path}")
    config = _single(path, "*.yaml", spec)
    return checkpoint, str(config) if config else None


@contextmanager
def _hydra_searching_only(config_dir: Path) -> Iterator[None]:
    """Hydra configured to find configs in `config_dir` alone (so a local yaml never resolves to a packaged
    config of the same name); hydra's previous global state (sam2's) is restored on exit."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.2"):
            yield
    finally:
        restore_gh_from_backup(backup)


def load_sam2_video_predictor(
    checkpoint_spec: str,
    config_name: str | None = None,
    *,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    storage: StorageConfig | None = None,
    cache_dir: str | None = None,
) -> SAM2VideoPredictor:
    """A frozen SAM2 video predictor (eval mode, on `device`) from a checkpoint spec (see
    `resolve_sam2_checkpoint`) and a config: a name packaged with sam2 (`configs/sam2.1/sam2.1_hiera_l.yaml`)
    or a local yaml path; None takes the config found beside the checkpoint. `image_size` overrides the
    config's input resolution (pixels)."""
    from sam2.build_sam import build_sam2_video_predictor

    checkpoint, config_beside = resolve_sam2_checkpoint(checkpoint_spec, storage, cache_dir)
    config = config_name or config_beside
    if config is None:
        raise ValueError(
            f"SAM2 spec {checkpoint_spec!r}: no config given and no *.yaml beside {checkpoint}; "
            "pass config_name (e.g. configs/sam2.1/sam2.1_hiera_l.yaml)"
        )
    overrides = [f"++model.image_size={int(image_size)}"] if image_size else []
    config_file = Path(config).expanduser()
    with _SAM2_BUILD_LOCK:
        try:
            if config_file.is_file():
                with _hydra_searching_only(config_file.resolve().parent):
                    predictor = build_sam2_video_predictor(
                        config_file.stem, str(checkpoint), device=str(device), hydra_overrides_extra=overrides
                    )
            else:
                predictor = build_sam2_video_predictor(
                    config, str(checkpoint), device=str(device), hydra_overrides_extra=overrides
                )
        except (RuntimeError, KeyError) as e:
            # sam2 logs the missing / unexpected keys and raises a bare RuntimeError.
            raise RuntimeError(
                f"SAM2 checkpoint {checkpoint} (spec {checkpoint_spec!r}) does not fit config {config!r}: "
                f"{e!r}; missing or unexpected keys are in the log above"
            ) from e
    if predictor.fill_hole_area > 0 and not sam2_extension_available():
        # sam2 fills small mask holes with its compiled extension; without it (a CPU build, or SAM2_BUILD_CUDA=0)
        # it warns on every frame and returns the mask unchanged: skipping the call gives the same masks, quietly
        predictor.fill_hole_area = 0
    return predictor


def sam2_extension_available() -> bool:
    """Whether sam2's compiled extension (`sam2._C`, connected components for hole filling) imports."""
    try:
        from sam2 import _C  # noqa: F401
    except ImportError:
        return False
    return True
