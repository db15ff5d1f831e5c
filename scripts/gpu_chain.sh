#!/usr/bin/env bash
# Runs benchmark commands one after another on the lent GPU machine, detached in a session of their own, so that a
# chain longer than one device call (10 minutes) goes on between calls while the machine stays warm (make the next
# call within its 30 s idle window), and follows it. Commands come from a file, one a line ('#' lines skipped), run
# from the repository root after `ray stop --force`, with .dev/scripts/env.sh sourced, the repository on PYTHONPATH
# and CHAIN set to /tmp/chain (write JSON there: `--out $CHAIN/name.json`). Command n's output goes to
# $CHAIN/<n>.log. With BUDGET_S (the device time left, in s) at `start`, commands can ask `chain_left_s` how much of
# it remains (to give a long command a timeout that leaves the next ones their time). Following prints the chain's
# progress lines (benchmarks print them with '[' first) until the chain ends or FOLLOW_S seconds (default 540) have
# passed; then, with OUT set (the device tool's), it packs the logs' last 3 MB, $CHAIN's JSON files and verl's work
# folder's logs and probe files into $OUT/chain.tgz: one file, as the tool brings back a few a call.
#   bash scripts/gpu_chain.sh start scripts/gpu_chains/verl_side_by_side.txt     # first call: starts, follows
#   FOLLOW_S=570 bash scripts/gpu_chain.sh follow                                  # the calls after
set -uo pipefail
cd "$(dirname "$0")/.."
CHAIN=/tmp/chain
FOLLOW_S=${FOLLOW_S:-540}

chain_left_s() {  # seconds of device time left (from BUDGET_S at `start`), or a day where none was given
  local end
  end=$(cat $CHAIN/end 2> /dev/null || echo $(($(date +%s) + 86400)))
  echo $((end - $(date +%s)))
}

run_chain() {  # the detached part: each command in turn, a line per start and end in $CHAIN/chain.txt
  source .dev/scripts/env.sh
  export PYTHONPATH=$PYTHONPATH:$PWD CHAIN TQDM_DISABLE=1 PATH=/tmp/site/bin:$PATH  # the recipe's `ray` there
  export -f chain_left_s
  local n=0
  while IFS= read -r command; do
    [[ -z "${command// }" || "$command" == \#* ]] && continue
    n=$((n + 1))
    echo "[$(date -u +%T)] $n starts: $command" >> $CHAIN/chain.txt
    ray stop --force > /dev/null 2>&1
    pkill -9 -f 'ray::|VLLM::|EngineCore' > /dev/null 2>&1  # what a killed run may leave holding GPU memory
    local start=$SECONDS
    bash -c "$command" > "$CHAIN/$n.log" 2>&1
    local rc=$?
    echo "[$(date -u +%T)] $n ended (exit $rc) after $((SECONDS - start)) s" >> $CHAIN/chain.txt
  done < "$1"
  ray stop --force > /dev/null 2>&1
  touch $CHAIN/done
}

follow() {
  local end=$((SECONDS + FOLLOW_S)) last=""
  while [ ! -f $CHAIN/done ] && [ $SECONDS -lt $end ]; do
    local log line
    log=$(ls -t $CHAIN/*.log 2> /dev/null | head -1)
    line=$(grep -a '^\[' "$log" 2> /dev/null | tail -1)
    [ -n "$line" ] && [ "$line" != "$last" ] && echo "$(basename "$log"): $line" && last=$line
    sleep 5
  done
  cat $CHAIN/chain.txt
  [ -f $CHAIN/done ] && echo "gpu_chain: done" || echo "gpu_chain: still running: follow it in the next call"
  if [ -n "${OUT:-}" ]; then
    local pack=/tmp/chain_pack
    rm -rf $pack && mkdir -p $pack
    cp $CHAIN/*.json $CHAIN/chain.txt $pack/ 2> /dev/null
    for f in $CHAIN/*.log /tmp/verlwork/*.log /tmp/verlwork/*.jsonl /tmp/verlwork/probe/*.json; do
      [ -f "$f" ] && tail -c 3000000 "$f" > "$pack/$(basename "$(dirname "$f")")_$(basename "$f")"
    done
    nvidia-smi > $pack/nvidia-smi.txt 2>&1
    tar czf "$OUT/chain.tgz" -C $pack .
  fi
}

case "${1:-}" in
  start)
    [ -f "${2:-}" ] || { echo "usage: $0 start COMMANDS_FILE"; exit 2; }
    rm -rf $CHAIN && mkdir -p $CHAIN
    [ -n "${BUDGET_S:-}" ] && echo $(($(date +%s) + BUDGET_S)) > $CHAIN/end
    setsid nohup bash "$0" run "$(realpath "$2")" > $CHAIN/chain_runner.log 2>&1 < /dev/null &
    sleep 2
    follow ;;
  run) mkdir -p $CHAIN && run_chain "$2" ;;
  follow) follow ;;
  *) echo "usage: $0 start COMMANDS_FILE | follow"; exit 2 ;;
esac
