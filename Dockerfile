# syntax=docker/dockerfile:1
# hvcodistill on CUDA GPUs: Open MPI, NCCL, torch 2.14.1 (CUDA 13.0 build) and Horovod 0.28.1
# built with NCCL GPU operations by scripts/setup.sh, the same script `make setup` runs.
#
# Build (BuildKit, the default builder of Docker >= 23; no GPU needed at build time):
#   docker build -t hvcodistill:latest .
# The build ends with `horovodrun --check-build`, which must show PyTorch, MPI and NCCL.
# Host: an NVIDIA driver >= 580 (CUDA 13.0) and the NVIDIA Container Toolkit; GPUs from Turing
# (sm_75) to Blackwell. For older drivers or pre-Turing GPUs, build on CUDA 12.6 instead (untested):
#   docker build -t hvcodistill:cu126 \
#     --build-arg CUDA_IMAGE=nvidia/cuda:12.6.3-devel-ubuntu22.04 \
#     --build-arg TORCH_SPEC="torch==2.14.1+cu126 torchvision==0.29.1+cu126 --extra-index-url https://download.pytorch.org/whl/cu126" .
#
# Run (the entrypoint is `python -m hvcodistill.train`: one rank, then --config and key=value):
#   docker run --rm --gpus all --shm-size=16g -v "$PWD/runs:/opt/hvcodistill/runs" hvcodistill:latest \
#     --config configs/digits_allreduce.yaml train.device=cuda
# Several ranks on one node (each rank takes the GPU of its node-local rank):
#   docker run --rm --gpus all --shm-size=16g --ulimit memlock=-1 --entrypoint python \
#     -v "$PWD/runs:/opt/hvcodistill/runs" hvcodistill:latest \
#     -m hvcodistill.launch -np 4 python -m hvcodistill.train --config configs/digits_codistill.yaml
#   (or --entrypoint mpirun / horovodrun with the same arguments after the image name). /dev/shm
#   carries NCCL's and the DataLoader workers' shared memory: keep --shm-size large, or --ipc=host.
#
# Apptainer / Singularity (HPC sites without Docker):
#   apptainer build hvcodistill.sif docker-daemon://hvcodistill:latest
#   apptainer run --nv hvcodistill.sif --config /opt/hvcodistill/configs/digits_allreduce.yaml \
#     run.dir="$PWD/runs/digits"
# The image is read-only under Apptainer and the working directory is the host's: give configs by
# absolute path (/opt/hvcodistill/configs/...) and point run.dir at a host directory.
# Multi-node: the host's launcher starts one container per rank (the "hybrid" MPI model; the
# host's MPI must be able to talk to the image's Open MPI 4.1, e.g. through PMIx):
#   srun --mpi=pmix -N 2 --ntasks-per-node=8 --gpus-per-node=8 \
#     apptainer exec --nv hvcodistill.sif python -m hvcodistill.train \
#     --config /opt/hvcodistill/configs/imagenet_resnet50_codistill.yaml data.path=/data/imagenet
#   mpirun -np 16 -H node1:8,node2:8 apptainer exec --nv hvcodistill.sif python -m hvcodistill.train ...

ARG CUDA_IMAGE=nvidia/cuda:13.0.2-devel-ubuntu22.04
FROM ${CUDA_IMAGE}

# torch/torchvision pip arguments for setup.sh; PyPI's Linux wheels of torch 2.14.1 are CUDA 13.0 builds.
ARG TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
ARG CUDA_IMAGE
ARG DEBIAN_FRONTEND=noninteractive

LABEL org.opencontainers.image.title="hvcodistill" \
      org.opencontainers.image.description="Codistillation for distributed training on Horovod/MPI clusters (Horovod 0.28.1 with NCCL, Open MPI, CUDA)" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${CUDA_IMAGE}"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Ubuntu 22.04 packages are pinned to their upstream release (Ubuntu's security revisions may
# follow); NCCL is pinned to the exact version the CUDA image ships and holds (NV_LIBNCCL_*,
# CUDA_VERSION come from the image), so apt never has to change a held package.
# InfiniBand / RoCE user space, named because --no-install-recommends leaves it out: libibverbs1
# and the ibverbs-providers (mlx5, efa, ...) let NCCL's IB transport and Open MPI's UCX/openib
# reach the HCAs the host passes in (--device=/dev/infiniband, or --privileged); librdmacm1 for
# RDMA connection setup; rdma-core's udev/config files; infiniband-diags gives ibstat and ibstatus
# to check the links from inside the container. Without them NCCL falls back to TCP sockets between nodes, silently.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      "openmpi-bin=4.1.2-*" "libopenmpi-dev=4.1.2-*" "openssh-client=1:8.9p1-*" \
      "rdma-core=39.0-*" "ibverbs-providers=39.0-*" "libibverbs1=39.0-*" "librdmacm1=39.0-*" \
      "infiniband-diags=39.0-*" \
      "python3=3.10.*" "python3-dev=3.10.*" "python3-venv=3.10.*" \
      "g++=4:11.2.*" "make=4.3-*" "git=1:2.34.1-*" \
      "libnccl2=${NV_LIBNCCL_PACKAGE_VERSION}+cuda${CUDA_VERSION%.*}" \
      "libnccl-dev=${NV_LIBNCCL_DEV_PACKAGE_VERSION}+cuda${CUDA_VERSION%.*}" \
 && rm -rf /var/lib/apt/lists/*

# nvcc stays on PATH and CUDA_HOME is set: setup.sh requires a CUDA toolkit for HVCODISTILL_GPU=1.
ENV PATH=/opt/venv/bin:/usr/local/cuda/bin:${PATH} \
    CUDA_HOME=/usr/local/cuda \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMPI_ALLOW_RUN_AS_ROOT=1 \
    OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
    OMPI_MCA_btl_vader_single_copy_mechanism=none

# The venv setup.sh installs into, with current pip/setuptools/wheel (Ubuntu's venv starts with
# pip 22 and setuptools 59; Horovod is built with --no-build-isolation against these). CMake 3.31.10
# from PyPI instead of Ubuntu's 3.22: CUDA 13 moved Thrust/CUB/libcu++ (nv/target, which cuda_fp16.h
# includes) to include/cccl, which 3.31.10 passes to g++ for Horovod's .cc files and 3.22 does not;
# CMake 4 would refuse the cmake_minimum_required of Horovod's bundled third-party code.
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/python -m pip install --no-cache-dir \
      "pip==26.3" "setuptools==84.2.1" "wheel==0.48.0" "cmake==3.31.10"

WORKDIR /opt/hvcodistill
COPY . .

# setup.sh: torch, Horovod 0.28.1 (patched, NCCL ops), mpi4py and hvcodistill (editable) into
# /opt/venv. There is no GPU at build time, so HVCODISTILL_GPU=1 forces the NCCL build (auto would
# pick CPU). VENV=system with PYTHON=/opt/venv/bin/python installs into that venv. The driver's
# libcuda is absent at build time; its stub is in the loader cache during these two steps only.
# The cache mounts keep pip downloads and setup.sh's Horovod wheel between builds, not in the image.
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=cache,target=/root/.cache/hvcodistill \
    ldconfig /usr/local/cuda/lib64/stubs \
 && HVCODISTILL_GPU=1 VENV=system PYTHON=/opt/venv/bin/python TORCH_SPEC="${TORCH_SPEC}" \
    HOROVOD_GPU_OPERATIONS=NCCL bash scripts/setup.sh \
 && ldconfig

# The build fails unless Horovod reports PyTorch, MPI and NCCL.
RUN ldconfig /usr/local/cuda/lib64/stubs \
 && horovodrun --check-build | tee /tmp/horovod-check-build.txt \
 && grep -q '\[X\] PyTorch' /tmp/horovod-check-build.txt \
 && grep -q '\[X\] MPI' /tmp/horovod-check-build.txt \
 && grep -q '\[X\] NCCL' /tmp/horovod-check-build.txt \
 && python -c 'import torch, horovod.torch, hvcodistill.train; assert torch.version.cuda, "CPU-only torch"' \
 && rm /tmp/horovod-check-build.txt \
 && ldconfig

# Run as an unprivileged user by default (docker run --user root for root; the OMPI_ALLOW_RUN_AS_ROOT
# variables above let mpirun start then). runs/ is where run.dir points by default: mount it.
RUN useradd --create-home --no-log-init --shell /bin/bash --uid 1000 hvcodistill \
 && mkdir -p /opt/hvcodistill/runs \
 && chown hvcodistill:hvcodistill /opt/hvcodistill/runs
USER 1000:1000

ENTRYPOINT ["/opt/venv/bin/python", "-m", "hvcodistill.train"]
CMD ["--help"]
