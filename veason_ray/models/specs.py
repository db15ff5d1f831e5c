"""What kind of checkpoint a model spec names, without loading anything (no torch): an s3:// copy, a URL, a
Hugging Face hub id (owner/name) or a local path. `loading` resolves specs; commands check them early."""

from __future__ import annotations

import re
from pathlib import Path

from veason_ray.object_store import is_s3_uri

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(spec: str) -> bool:
    """owner/name that is not a local path here."""
    return bool(HUB_ID.match(spec)) and not Path(spec).exists()


def is_local_path(spec: str) -> bool:
    """Neither s3:// nor another URL nor a hub id: a file or folder of this machine."""
    return bool(spec) and not is_s3_uri(spec) and "://" not in spec and not is_hub_id(spec)
