# GPU image for megatron-omni training (H100).  Not yet built or measured: Docker is unavailable on the
# dev machine.
#
# The NGC PyTorch image already brings a CUDA build of torch (+ torchvision), Transformer Engine, apex,
# DALI, NCCL and cuDNN, all version-matched by NVIDIA.  Do not pip-install torch, transformer-engine or
# nvidia-dali here: PyPI builds would replace NGC's and break the matching (the image's pip constraint
# file also pins them).  25.10: Python 3.12, CUDA 13.0.
#   docker build -t megatron-omni .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 -it megatron-omni \
#       bash examples/single_node_8b.sh
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE_IMAGE}

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

# megatron-core without its dependency resolution (its deps, torch/numpy/packaging, come from the image).
RUN pip install --no-deps "megatron-core==0.16.1"

# What megatron-omni needs beyond the image.  sentencepiece, psutil, pyyaml and tensorboard are normally
# in NGC already (then this is a no-op); av (PyAV, media decoding) is not.
RUN pip install sentencepiece psutil pyyaml tensorboard av
# torchaudio (the reference audio resampler): the image's when it has one, else the PyPI wheel without
# dependencies (it must not replace NGC's torch).  Should its extension not load against NGC's torch
# build, data/media/audio.py resamples with PyAV (FFmpeg) instead and logs that once.
RUN python -c "import torchaudio" 2>/dev/null || pip install --no-deps torchaudio

WORKDIR /workspace/megatron-omni
COPY . .
RUN pip install --no-deps -e . \
 && python -c "import torch, megatron.core, transformer_engine, megatron_omni; print('torch', torch.__version__, '| megatron-core', megatron.core.__version__, '| TE', transformer_engine.__version__)"
