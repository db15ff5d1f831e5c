#!/usr/bin/env bash
# benchmarks/peer_grpo_step.py on the GPU machine across two device calls (issue 29). verl's start-up, warm-up step
# and timed step outlast one 10-minute call, so `start` runs the benchmark in a session of its own (it outlives the
# call while the machine stays warm: make the next call within 30 s) and shows its progress for FOLLOW_S seconds;
# `wait`, in the next call, follows it to its end and copies its JSON and logs into $OUT.
#   FOLLOW_S=150 bash scripts/peer_grpo_step_gpu.sh start --model /tmp/bench_models/qwen2_5_vl_3b_random \
#     --ours /tmp/peer_grpo_step/ours.json        # after benchmarks/grpo_step.py --out /tmp/peer_grpo_step/ours.json
#   FOLLOW_S=570 bash scripts/peer_grpo_step_gpu.sh wait
set -uo pipefail
cd "$(dirname "$0")/.."
RUN=/tmp/peer_grpo_step
FOLLOW_S=${FOLLOW_S:-540}

running() { [ -f $RUN/pid ] && kill -0 "$(cat $RUN/pid)" 2>/dev/null; }

follow() {  # until the run ends or FOLLOW_S have passed, then its progress lines (and the table once it ended)
  local end=$((SECONDS + FOLLOW_S))
  while running && [ $SECONDS -lt "$end" ]; do sleep 5; done
  if running; then
    grep -a '^\[' $RUN/run.log | tail -30
    echo "peer_grpo_step: still running after ${SECONDS} s of this call: follow it with '$0 wait'"
  else
    tail -n 90 $RUN/run.log
    cp $RUN/verl.json $RUN/verl.log $RUN/run.log "${OUT:-$RUN}"/ 2>/dev/null
  fi
}

case "${1:-}" in
  start)
    shift
    source .dev/scripts/env.sh
    export PYTHONPATH=$PYTHONPATH:$PWD
    mkdir -p $RUN
    setsid nohup python3 benchmarks/peer_grpo_step.py --timeout-s 1500 --out $RUN/verl.json "$@" \
      > $RUN/run.log 2>&1 < /dev/null &
    echo $! > $RUN/pid
    follow ;;
  wait) follow ;;
  *) echo "usage: $0 start [peer_grpo_step.py arguments] | wait"; exit 2 ;;
esac
