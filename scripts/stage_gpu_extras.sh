#!/usr/bin/env bash
# Downloads (here, with PyPI) the cp312 wheels the lent GPU machine needs beyond ../shared/device/stage.sh's
# parts: pycocotools (the dataset readers), vLLM 0.26's structured-output dependencies (constrained answers:
# `inference.constrain_answer`) and Ray Serve's HTTP server (uvicorn, h11) with python-multipart (uploads), into
# OUT (default .whl, git-ignored). There, after the two install calls:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.whl}
mkdir -p "$OUT"
PLAT=(--python-version 3.12 --implementation cp --only-binary=:all:
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64)
python3 -m pip download -q --no-deps "${PLAT[@]}" -d "$OUT" \
  pycocotools==2.0.11 outlines_core==0.2.14 lark==1.2.2 lm-format-enforcer==0.11.3 interegular==0.3.3 \
  uvicorn==0.54.0 h11==0.16.0 python-multipart==0.0.34
ls -1 "$OUT"
