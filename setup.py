"""Packaging for megatron-omni.

Install for development (CPU is enough for the test suite):
    pip install torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0
    pip install -e ".[dev]"
`tools/setup_env.sh` does exactly this into a cached virtualenv, pinned by
requirements/constraints.txt.  On GPU clusters use the Dockerfile (NGC image:
torch, Transformer Engine, apex and DALI come from the image).
"""

from setuptools import find_packages, setup

# DALI: one wheel per CUDA major; its CPU operators ship in the same wheel, so the
# cuda130 wheel also serves CPU-only media pipelines.  Transformer Engine: the core
# library must match torch's CUDA major (the PyPI torch 2.11 wheels are CUDA 13).
DALI = "nvidia-dali-cuda130"

setup(
    name="megatron-omni",
    version="0.1.0",
    description="Omni-modal (text, image, audio, video) training on megatron-core",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_omni", "megatron_omni.*"]),
    package_data={"megatron_omni": ["assets/**/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.6",
        "torchvision",
        "torchaudio",
        # 0.16.1 is the newest release for Python 3.11; newer ones need Python 3.12.
        "megatron-core>=0.16.1,<0.18",
        "numpy",
        "packaging",
        # megatron-core's checkpoint writer imports psutil at save time but does not declare it.
        "psutil",
        "pyyaml",
        "sentencepiece",
        "tensorboard",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch,core_cu13]", DALI],
        "media": ["av", DALI],
        # av + DALI: the media tests decode with both (DALI's CPU operators run without a GPU).
        "dev": ["pytest", "pytest-timeout", "transformers", "safetensors", "av", DALI],
    },
    entry_points={
        "console_scripts": [
            "megatron-omni-train=megatron_omni.train:main",
        ],
    },
)
