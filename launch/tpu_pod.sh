#!/usr/bin/env bash
# `dsv4 train` on every worker of a Cloud TPU VM slice, with gcloud.
#
#   launch/tpu_pod.sh [--dry-run] --name NAME --zone ZONE --type TYPE [--project P] [--version V] [--create]
#                     -- dsv4 train --config X ...
#
# 1. --create: create the slice (gcloud compute tpus tpu-vm create) unless it exists; without --create it
#    must exist. 2. Copy this checkout's committed files (git archive HEAD) to every worker and install them
#    with jax[tpu]. 3. Start COMMAND on all workers in the background with the TPU XLA flags of
#    launch/xla_flags.sh and --coordinator=auto (JAX finds the slice's workers itself), logging to
#    ~/dsv4_jax/train.log. 4. Stream worker 0's log here (Ctrl-C stops the streaming, not the training).
# --dry-run prints each command (shell-quoted) instead of running it.
set -euo pipefail

usage() {
  echo "usage: $0 [--dry-run] --name NAME --zone ZONE --type TYPE [--project P] [--version V] [--create] -- COMMAND..." >&2
  exit 2
}

dry_run=0 create=0 name="" zone="" type="" project="" version="v2-alpha-tpuv5"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --create) create=1; shift ;;
    --name) name="${2:?--name: expected the TPU VM name}"; shift 2 ;;
    --zone) zone="${2:?--zone: expected a zone, e.g. us-east5-a}"; shift 2 ;;
    --type) type="${2:?--type: expected an accelerator type, e.g. v5p-256}"; shift 2 ;;
    --project) project="${2:?--project: expected a project id}"; shift 2 ;;
    --version) version="${2:?--version: expected a TPU software version}"; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown argument $1" >&2; usage ;;
  esac
done
[[ -n "$name" ]] || { echo "--name: required" >&2; usage; }
[[ -n "$zone" ]] || { echo "--zone: required" >&2; usage; }
[[ "$type" =~ ^v[0-9]+[a-z]*(litepod)?-[0-9]+$ ]] || { echo "--type: expected e.g. v5p-256 or v6e-64, got '$type'" >&2; exit 2; }
[[ $# -gt 0 ]] || { echo "expected the command after --, e.g. -- dsv4 train --config flash_train" >&2; exit 2; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/xla_flags.sh
source "$here/xla_flags.sh"
tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone")
[[ -n "$project" ]] && where+=(--project="$project")

run() {   # prints the command, shell-quoted; runs it unless --dry-run
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  ((dry_run)) || "$@"
}

if ((create)); then
  if ((dry_run)) || ! "${tpu[@]}" describe "$name" "${where[@]}" > /dev/null 2>&1; then
    run "${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$type" --version="$version"
  fi
fi
printf -v command '%q ' "$@"
archive="${TMPDIR:-/tmp}/dsv4_jax.tar.gz"
setup="mkdir -p ~/dsv4_jax && tar -xzf ~/dsv4_jax.tar.gz -C ~/dsv4_jax && pip install -q 'jax[tpu]' -e ~/dsv4_jax"
start="cd ~/dsv4_jax && LIBTPU_INIT_ARGS='${TPU_XLA_FLAGS[*]}' nohup ${command}--coordinator=auto > train.log 2>&1 &"
run git -C "$(dirname "$here")" archive --format=tar.gz -o "$archive" HEAD
run "${tpu[@]}" scp "$archive" "$name:~/dsv4_jax.tar.gz" --worker=all "${where[@]}"
run "${tpu[@]}" ssh "$name" --worker=all "${where[@]}" --command="$setup"
run "${tpu[@]}" ssh "$name" --worker=all "${where[@]}" --command="$start"
run "${tpu[@]}" ssh "$name" --worker=0 "${where[@]}" --command="tail -n +1 -F ~/dsv4_jax/train.log"
