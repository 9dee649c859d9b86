#!/usr/bin/env bash
# Many nodes (also one): torchrun with a c10d rendezvous. Run this once on every node, with the
# same MASTER_ADDR/MASTER_PORT and RDZV_ID everywhere and NODE_RANK = 0..NNODES-1.
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 examples/launch/multi_node.sh CONFIG.yaml [key=value ...]
#
# Environment (defaults in brackets):
#   NNODES          number of nodes                                          [1]
#   NODE_RANK       this node's index (ranks are assigned by the rendezvous) [0]
#   NPROC_PER_NODE  processes per node, one per GPU                          [8]
#   MASTER_ADDR     host of the rendezvous store (node 0)                    [127.0.0.1]
#   MASTER_PORT     its port                                                 [29500]
#   RDZV_ID         job id shared by all nodes                               [camopd]
#   RDZV_BACKEND    c10d, or static (then NODE_RANK fixes the rank order)    [c10d]
#   MAX_RESTARTS    torchrun restarts of the whole worker group on failure   [0]
#   CAMOPD_ENTRY    python module torchrun runs (-m)                         [camopd_megatron.cli]
#   PYTHON          interpreter with the package    [the repository's .venv/bin/python, else python3]
#   TORCHRUN        the torchrun command                          [$PYTHON -m torch.distributed.run]
#                   (torchrun_cmd.sh: no need to activate the virtual environment)
#   SIGNALS_TO_HANDLE  signals torchrun forwards to the workers (the trainer finishes its step,
#                   saves and exits on SIGTERM/SIGUSR1)          [SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1]
#   SHUTDOWN_TIMEOUT_S seconds torchrun waits after forwarding a signal before it SIGKILLs the
#                   workers: longer than one step plus one checkpoint save          [600]
#   OMP_NUM_THREADS CPU threads per process                                  [1]
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 CONFIG.yaml [key=value ...]" >&2
    exit 2
fi
CONFIG="$1"
shift

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_ID="${RDZV_ID:-camopd}"
RDZV_BACKEND="${RDZV_BACKEND:-c10d}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
CAMOPD_ENTRY="${CAMOPD_ENTRY:-camopd_megatron.cli}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
SIGNALS_TO_HANDLE="${SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
SHUTDOWN_TIMEOUT_S="${SHUTDOWN_TIMEOUT_S:-600}"
source "$(dirname "${BASH_SOURCE[0]}")/torchrun_cmd.sh"  # sets TORCHRUN_CMD

echo "multi_node.sh: node ${NODE_RANK}/${NNODES}, ${NPROC_PER_NODE} proc(s), rendezvous ${MASTER_ADDR}:${MASTER_PORT} id ${RDZV_ID}" >&2
exec "${TORCHRUN_CMD[@]}" \
    --nnodes "${NNODES}" \
    --node_rank "${NODE_RANK}" \
    --nproc_per_node "${NPROC_PER_NODE}" \
    --signals-to-handle "${SIGNALS_TO_HANDLE}" \
    --shutdown-timeout "${SHUTDOWN_TIMEOUT_S}" \
    --rdzv_backend "${RDZV_BACKEND}" \
    --rdzv_endpoint "${MASTER_ADDR}:${MASTER_PORT}" \
    --rdzv_id "${RDZV_ID}" \
    --max_restarts "${MAX_RESTARTS}" \
    -m "${CAMOPD_ENTRY}" \
    --config "${CONFIG}" "$@"
