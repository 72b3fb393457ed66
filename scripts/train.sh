#!/usr/bin/env bash
# Usage: bash scripts/train.sh CONFIG.yaml [key=value ...]
# Re-running with the same run.dir resumes from its newest intact checkpoint. When the run fails
# at runtime (exit 1: a trainer or actor error, a timeout, a full disk), this launcher resumes it,
# up to AREAL_LIKE_MAX_RESTARTS times (default 3). It never retries exit 2 (a config or input
# error, a run.dir locked by another run, no intact checkpoint: the same command would fail the
# same way) nor a run stopped on purpose (130 Ctrl-C, 143 SIGTERM).
set -uo pipefail
if [ $# -lt 1 ]; then echo "usage: bash scripts/train.sh CONFIG.yaml [key=value ...]" >&2; exit 2; fi
root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/scripts/setup_venv.sh" || exit 1
set +e  # setup_venv.sh turns on errexit; a failed run must reach the retry logic below
max_restarts=${AREAL_LIKE_MAX_RESTARTS:-3}
attempt=0
while true; do
  areal-like train --config "$@" &
  child=$!
  trap 'kill -TERM $child 2>/dev/null' TERM INT
  wait $child; rc=$?
  # wait returns early when a trapped signal arrives: wait again for the checkpoint to finish
  while kill -0 $child 2>/dev/null; do wait $child; rc=$?; done
  trap - TERM INT
  case $rc in
    0) exit 0 ;;
    2|130|143) exit $rc ;;  # config/input error, or stopped on purpose: retrying would not help
  esac
  attempt=$((attempt + 1))
  if [ $attempt -gt "$max_restarts" ]; then
    echo "[train.sh] run failed with exit code $rc after $max_restarts restarts; giving up" >&2
    exit $rc
  fi
  echo "[train.sh] run failed with exit code $rc; resuming from the latest checkpoint (restart $attempt/$max_restarts)" >&2
  sleep 5
done
