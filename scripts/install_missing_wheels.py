"""Install, into /tmp/site (the GPU machine's extra site folder), the wheels of a folder whose distributions
Python cannot find yet; the ones it has are left alone, so a carried wheel never replaces a pinned package
(usage: python3 scripts/install_missing_wheels.py .whl/serve, after sourcing .dev/scripts/env.sh)."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

TARGET = "/tmp/site"


def missing(folder: Path) -> list[Path]:
    wheels = []
    for wheel in sorted(folder.glob("*.whl")):
        name = wheel.name.split("-", 1)[0].replace("_", "-")
        try:
            version(name)
        except PackageNotFoundError:
            wheels.append(wheel)
    return wheels


def main() -> int:
    todo = missing(Path(sys.argv[1]))
    print("installing:", " ".join(w.name.split("-", 1)[0] for w in todo) or "nothing")
    if todo:
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", TARGET]
        subprocess.check_call([*pip, *map(str, todo)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
