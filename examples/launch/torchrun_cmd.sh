# Sourced by single_node.sh and multi_node.sh: sets TORCHRUN_CMD (an array), the torchrun to run.
#
#   TORCHRUN  the torchrun command, used as given (e.g. "torchrun")   [unset: $PYTHON -m torch.distributed.run]
#   PYTHON    the interpreter that has the package installed           [the repository's .venv/bin/python if
#                                                                       present (what `make` creates), else python3]
# So the scripts work without activating the virtual environment. Inside a container whose image
# has the package installed while the repository (with a host .venv) is mounted, set PYTHON=python3.
# CUDA_DEVICE_MAX_CONNECTIONS=1 lets megatron overlap tensor-parallel communication with compute
# (it recommends it whenever TP > 1); an explicit value in the environment wins.
_CAMOPD_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ -n "${TORCHRUN:-}" ]]; then
    read -r -a TORCHRUN_CMD <<< "${TORCHRUN}"
else
    if [[ -z "${PYTHON:-}" ]]; then
        if [[ -x "${_CAMOPD_REPO}/.venv/bin/python" ]]; then
            PYTHON="${_CAMOPD_REPO}/.venv/bin/python"
        else
            PYTHON=python3
        fi
    fi
    TORCHRUN_CMD=("${PYTHON}" -m torch.distributed.run)
fi
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
