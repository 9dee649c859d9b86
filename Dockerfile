# camopd_megatron on GPUs: NVIDIA's PyTorch container + megatron-core + transformer-engine.
#
#   docker build -t camopd:0.1.0 .
#   docker run --gpus all --ipc=host --rm -v "$PWD:/workspace/run" camopd:0.1.0 \
#       camopd-train --config /workspace/run/my.yaml --dry-run --world-size 8
#
# Pinned base: 25.12 ships CUDA 13.1, PyTorch 2.10, Python 3.12 (megatron-core 0.19.2 declares
# Python >= 3.12) and a prebuilt transformer-engine matching that torch/CUDA; bump deliberately.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}

# megatron-core 0.19.2: the CPU compatibility layer and per-role process groups depend on its internals.
ARG MCORE_VERSION=0.19.2
# transformer-engine floor for FP8 (delayed/tensorwise/blockwise/mxfp8 recipes in megatron-core 0.19); the base image's build is used.
ARG TE_MIN_VERSION=2.4
# Set to e.g. 2.10.0 to rebuild transformer-engine against the image's torch (slow: compiles); empty = keep the image's.
ARG TE_VERSION=""
# Non-root user id (25.x images already own uid 1000 as "ubuntu").
ARG USER_UID=10001

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# --no-deps keeps the image's torch/numpy (its /etc/pip/constraint.txt pins them); mcore's hard deps are already there.
RUN python -m pip install --no-deps "megatron-core==${MCORE_VERSION}" \
    && if [ -n "${TE_VERSION}" ]; then \
        python -m pip install --no-build-isolation "transformer-engine[pytorch]==${TE_VERSION}"; \
    fi \
    && python -c "import sys, importlib.metadata as m; from packaging.version import Version as V; \
te = m.version('transformer_engine'); print('transformer-engine', te); \
sys.exit(0 if V(te) >= V('${TE_MIN_VERSION}') else 'transformer-engine ' + te + ' < ${TE_MIN_VERSION}')"

WORKDIR /opt/camopd
COPY setup.py README.md ./
COPY camopd_megatron ./camopd_megatron
COPY examples ./examples
RUN python -m pip install . \
    && useradd --create-home --uid "${USER_UID}" --user-group --shell /bin/bash camopd \
    && mkdir -p /workspace/run \
    && chown camopd:camopd /workspace/run

USER ${USER_UID}
WORKDIR /workspace/run
# Smoke check: the entry point resolves and parses without a GPU.
RUN camopd-train --help > /dev/null
CMD ["camopd-train", "--help"]
