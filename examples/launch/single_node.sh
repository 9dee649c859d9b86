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
source "$(dirname "${BASH_SOURCE[0]}")/torchrun_cmd.sh"  # sets TORCHRUN_CMD

exec "${TORCHRUN_CMD[@]}" \
    --standalone \
    --nnodes 1 \
    --nproc_per_node "${NPROC_PER_NODE}" \
    -m "${CAMOPD_ENTRY}" \
    --config "${CONFIG}" "$@"
