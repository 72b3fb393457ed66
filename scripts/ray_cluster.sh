#!/usr/bin/env bash
# A Ray cluster for multi-node runs.
#   on the head node:   bash scripts/ray_cluster.sh head [--port 6379]
#   on each worker:     bash scripts/ray_cluster.sh join HEAD_IP[:PORT]
#   on every node:      bash scripts/ray_cluster.sh stop
#   anywhere:           bash scripts/ray_cluster.sh status
# Then train from the head node with `ray.address=auto`:
#   bash scripts/train.sh configs/quickstart.yaml ray.address=auto run.dir=/shared/runs/x
# run.dir must be on storage every node can reach when trainer ranks span nodes (checkpoints).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/scripts/setup_venv.sh"
cmd=${1:-}
shift || true
case "$cmd" in
  head)
    port=6379
    if [ "${1:-}" = "--port" ]; then port=$2; shift 2; fi
    ray start --head --port "$port" --include-dashboard=false "$@"
    echo "[ray_cluster] head started; join workers with: bash scripts/ray_cluster.sh join $(hostname -I | awk '{print $1}'):$port"
    ;;
  join)
    addr=${1:?usage: ray_cluster.sh join HEAD_IP[:PORT]}
    shift
    case "$addr" in *:*) ;; *) addr="$addr:6379" ;; esac
    ray start --address "$addr" "$@"
    ;;
  stop) ray stop --force ;;
  status) ray status ;;
  *) echo "usage: bash scripts/ray_cluster.sh head [--port P] | join HEAD_IP[:PORT] | stop | status" >&2; exit 2 ;;
esac
