#!/usr/bin/env bash
# N processes of one multi-process command on this machine, joined over localhost: how multi-host runs
# are tested without a cluster (with fake CPU devices, --cpu_devices), or how one host's GPUs run one
# process each.
#
#   launch/local_multiprocess.sh [--dry-run] [--port PORT] [--cpu_devices D] [--logs DIR] N -- COMMAND...
#   e.g. launch/local_multiprocess.sh --cpu_devices 4 2 -- dsv4 train --config tiny --set mesh.expert=4
#
# Process i runs COMMAND --coordinator=localhost:PORT --num_processes=N --process_id=i (with
# JAX_NUM_CPU_DEVICES=D when --cpu_devices is given), writing to DIR/process_i.log; process 0's log is
# streamed here. When a process fails, the others are stopped and its exit status is returned.
set -euo pipefail

usage() {
  echo "usage: $0 [--dry-run] [--port PORT] [--cpu_devices D] [--logs DIR] N -- COMMAND..." >&2
  exit 2
}

dry_run=0 port=12355 cpu_devices="" logs="" count=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --port) port="${2:?--port: expected a port number}"; shift 2 ;;
    --cpu_devices) cpu_devices="${2:?--cpu_devices: expected a number}"; shift 2 ;;
    --logs) logs="${2:?--logs: expected a directory}"; shift 2 ;;
    --) shift; break ;;
    -*) echo "unknown option $1" >&2; usage ;;
    *) [[ -z "$count" ]] || usage; count="$1"; shift ;;
  esac
done
[[ "$count" =~ ^[1-9][0-9]*$ ]] || { echo "N: expected a positive number of processes, got '$count'" >&2; usage; }
[[ "$port" =~ ^[0-9]+$ ]] || { echo "--port: expected a number, got '$port'" >&2; exit 2; }
[[ -z "$cpu_devices" || "$cpu_devices" =~ ^[1-9][0-9]*$ ]] || {
  echo "--cpu_devices: expected a positive number, got '$cpu_devices'" >&2; exit 2; }
[[ $# -gt 0 ]] || { echo "expected the command after --, e.g. -- dsv4 train --config tiny" >&2; exit 2; }
logs="${logs:-$(mktemp -d)}"

environment=()
[[ -n "$cpu_devices" ]] && environment+=("JAX_NUM_CPU_DEVICES=$cpu_devices")
for ((i = 0; i < count; i++)); do
  echo "process $i: ${environment[*]:+${environment[*]} }$* --coordinator=localhost:$port --num_processes=$count" \
       "--process_id=$i > $logs/process_$i.log"
done
((dry_run)) && exit 0
mkdir -p "$logs"

pids=()
for ((i = 0; i < count; i++)); do
  env "${environment[@]}" "$@" "--coordinator=localhost:$port" "--num_processes=$count" "--process_id=$i" \
      > "$logs/process_$i.log" 2>&1 &
  pids+=("$!")
done
tail -n +1 -f --pid="${pids[0]}" "$logs/process_0.log" &

stop_all() {
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap stop_all INT TERM

running=$count
while ((running > 0)); do
  for i in "${!pids[@]}"; do
    pid="${pids[$i]}"
    kill -0 "$pid" 2>/dev/null && continue
    status=0
    wait "$pid" || status=$?
    unset 'pids[i]'
    running=$((running - 1))
    if ((status != 0)); then
      echo "process $i exited with status $status; stopping the others. Its log ($logs/process_$i.log) ends:" >&2
      tail -n 5 "$logs/process_$i.log" >&2
      stop_all
      exit "$status"
    fi
  done
  sleep 1
done
wait
