#!/usr/bin/env bash
# One node, N GPUs (or N CPU processes with gloo): torchrun --standalone.
#
#   examples/launch/single_node.sh CONFIG.yaml [key=value ...] [--dry-run ...]
#
# Environment (defaults in brackets):
#   NPROC_PER_NODE  processes on this node, one per GPU                      [8]
#   CAMOPD_ENTRY    python module torchrun runs (-m)                         [camopd_megatron.cli]
#                   camopd_megatron.launch_check only brings the world up and all-reduces once
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

NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
CAMOPD_ENTRY="${CAMOPD_ENTRY:-camopd_megatron.cli}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
SIGNALS_TO_HANDLE="${SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
SHUTDOWN_TIMEOUT_S="${SHUTDOWN_TIMEOUT_S:-600}"
source "$(dirname "${BASH_SOURCE[0]}")/torchrun_cmd.sh"  # sets TORCHRUN_CMD

exec "${TORCHRUN_CMD[@]}" \
    --standalone \
    --nnodes 1 \
    --nproc_per_node "${NPROC_PER_NODE}" \
    --signals-to-handle "${SIGNALS_TO_HANDLE}" \
    --shutdown-timeout "${SHUTDOWN_TIMEOUT_S}" \
    -m "${CAMOPD_ENTRY}" \
    --config "${CONFIG}" "$@"
