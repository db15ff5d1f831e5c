#!/usr/bin/env bash
# Downloads (here, with PyPI) verl 0.9.1, the current release, and what its GRPO path needs beyond the GPU recipe
# (../shared/device/stage.sh's parts, scripts/stage_gpu_extras.sh's .whl/base) as cp312 manylinux wheels into OUT
# (default .whl/verl, git-ignored, ~4 MiB), for benchmarks/peer_grpo_step.py (issue 29). Nothing of verl is
# committed; it is fetched here by name and version.
#   verl, TransferQueue (trainer.use_v1 only), tensordict + pyvers, codetiming, torchdata, orjson: verl's imports
#   datasets + dill + multiprocess: verl's parquet reader; qwen-vl-utils: verl's image path
#   model-hosting-container-standards + jmespath, prometheus-fastapi-instrumentator: vLLM 0.26's OpenAI server,
#     which verl's rollout runs (ours drives vLLM's LLM class and never imports it); it also needs watchfiles,
#     staged already in .whl/serve
# Not staged: what the machine or the recipe has (torch 2.11, vLLM 0.26, transformers 5.17, Ray 2.60, hydra, pyzmq,
# msgspec, fastapi, uvicorn, pandas, pyarrow, peft, accelerate, numpy, ...); what this path never imports (wandb,
# pylatexenc, mathruler, nvtx, liger-kernel, trl: checked by importing verl with every other package hidden);
# flash-attn (PyPI has only its source: benchmarks/peer_grpo_step.py says what that changes).
# There, once the two install calls of ../shared/device/README.md have run (.whl/base, .whl/verl and .whl/serve's
# watchfiles wheel carried too):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/base/*.whl \
#     .whl/serve/watchfiles-*.whl .whl/verl/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.whl/verl}
mkdir -p "$OUT"
rm -f "$OUT"/*.whl  # one version of each: two stop the install there
PLAT=(--no-deps --python-version 3.12 --implementation cp --only-binary=:all:
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64)
python3 -m pip download -q "${PLAT[@]}" -d "$OUT" \
  verl==0.9.1 transferqueue==0.1.11 tensordict==0.10.0 pyvers==0.1.0 codetiming==1.4.0 torchdata==0.11.0 \
  orjson==3.13.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 qwen-vl-utils==0.0.14 \
  model-hosting-container-standards==0.1.16 jmespath==1.1.0 prometheus-fastapi-instrumentator==8.1.0
du -sh "$OUT"
