#!/usr/bin/env bash
# One-command set-up for hvcodistill: Open MPI, a venv, torch/torchvision, Horovod 0.28.1 built
# for current PyTorch (patched; see patch_horovod), mpi4py and the package in editable mode.
# Idempotent: a second run reuses the venv and the cached Horovod wheel and takes seconds.
# The Dockerfile calls this same script.
#
# Environment (all optional):
#   VENV=.venv                       where the venv goes ("system" installs into the current python)
#   PYTHON=python3                   interpreter that creates the venv
#   TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"   what pip installs for torch
#   HVCODISTILL_GPU=auto|0|1         1: build Horovod with NCCL ops (GPU node with a CUDA toolkit);
#                                    0: CPU-only build; auto: 1 when nvidia-smi sees a GPU
#   HVCODISTILL_CACHE=~/.cache/hvcodistill   where built Horovod wheels are kept
#   HVCODISTILL_SKIP_APT=1           never call apt-get (no root, or MPI from a module system)
#   HVCODISTILL_HOROVOD=0            no Horovod: neither built nor checked (no g++ or cmake needed);
#                                    runs then take train.backend=torch (docs/setup.md)
set -euo pipefail

HOROVOD_VERSION=0.28.1
MIN_TORCH=2.1
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
CACHE=${HVCODISTILL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hvcodistill}
GPU=${HVCODISTILL_GPU:-auto}
WITH_HOROVOD=${HVCODISTILL_HOROVOD:-1}
[[ $WITH_HOROVOD == 0 || $WITH_HOROVOD == 1 ]] || { printf 'setup: error: HVCODISTILL_HOROVOD must be 0 or 1, not %s\n' "$WITH_HOROVOD" >&2; exit 2; }

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 2; }
log() { # run a command quietly; on failure show the tail of its log and stop with one line
  local what=$1; shift
  local logf="$CACHE/logs/$(echo "$what" | tr ' /' '__').log"
  mkdir -p "$CACHE/logs"
  if ! "$@" >"$logf" 2>&1; then
    tail -n 25 "$logf" >&2
    die "$what failed (full log: $logf)"
  fi
}

# --- system prerequisites -------------------------------------------------------------------
need_apt=()
command -v mpirun >/dev/null 2>&1 || need_apt+=(openmpi-bin)
command -v mpicc >/dev/null 2>&1 || need_apt+=(libopenmpi-dev)
if [[ $WITH_HOROVOD == 1 ]]; then # what building Horovod needs
  command -v g++ >/dev/null 2>&1 || need_apt+=(g++)
  command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
fi
# optional: ip and tc (iproute2) build the emulated cluster (bench --cluster, its tests as root)
PATH=$PATH:/usr/sbin:/sbin command -v tc >/dev/null 2>&1 || [[ $(id -u) != 0 ]] || need_apt+=(iproute2)
if ((${#need_apt[@]})); then
  if [[ ${HVCODISTILL_SKIP_APT:-0} != 1 ]] && command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
    say "installing ${need_apt[*]} with apt-get"
    log "apt-get update" apt-get update
    log "apt-get install" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need_apt[@]}"
  fi
fi
command -v mpirun >/dev/null 2>&1 || die "no mpirun on PATH: install Open MPI (Debian: apt-get install openmpi-bin libopenmpi-dev) or load your cluster's MPI module"
command -v mpicc >/dev/null 2>&1 || die "no mpicc on PATH: install the MPI headers (Debian: libopenmpi-dev)"
if [[ $WITH_HOROVOD == 1 ]]; then
  command -v g++ >/dev/null 2>&1 || die "no C++ compiler (g++) on PATH: install g++ (Debian: apt-get install g++), or set up without Horovod: HVCODISTILL_HOROVOD=0"
  command -v cmake >/dev/null 2>&1 || die "no cmake on PATH: install cmake >= 3.13, or set up without Horovod: HVCODISTILL_HOROVOD=0"
fi

# --- venv and python packages ---------------------------------------------------------------
if [[ $VENV == system ]]; then
  PY=$(command -v "$PYTHON")
else
  [[ $VENV == /* ]] || VENV=$ROOT/$VENV       # relative to the checkout, or absolute (/opt/venv)
  if [[ ! -x $VENV/bin/python ]]; then
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV" || die "could not create a venv with $PYTHON (Debian: apt-get install python3-venv)"
  fi
  PY=$VENV/bin/python
fi
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 9))' || die "$PY is older than Python 3.9"

# one interpreter start per question: each one that imports torch costs seconds
torch_version() { # prints torch's version if torch >= MIN_TORCH and torchvision import
  "$PY" - "$MIN_TORCH" <<'PYEOF' 2>/dev/null
import sys
import torch, torchvision  # noqa: F401
from packaging.version import Version
if Version(torch.__version__.split("+")[0]) < Version(sys.argv[1]):
    sys.exit(1)
print(torch.__version__, "cuda" if torch.version.cuda else "cpu")
PYEOF
}
if ! TORCH_PROBE=$(torch_version); then
  say "installing $TORCH_SPEC"
  log "pip install torch" "$PY" -m pip install $TORCH_SPEC packaging
  TORCH_PROBE=$(torch_version) ||
    die "torch >= $MIN_TORCH with torchvision is required; $PY has $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo none)"
fi
read -r TORCH_VERSION TORCH_BUILD <<<"$TORCH_PROBE"

# Horovod's build-time imports: it is built with --no-build-isolation against the torch above.
[[ $WITH_HOROVOD == 0 ]] || "$PY" -c 'import packaging, cloudpickle, psutil, yaml, cffi, wheel' 2>/dev/null ||
  log "pip install build deps" "$PY" -m pip install packaging cloudpickle psutil pyyaml cffi wheel setuptools

# --- Horovod --------------------------------------------------------------------------------
if [[ $GPU == auto ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then GPU=1; else GPU=0; fi
fi
if [[ $GPU == 1 ]]; then
  [[ $TORCH_BUILD == cuda ]] ||
    die "HVCODISTILL_GPU=1 but $TORCH_VERSION is not a CUDA build of torch"
  # NCCL for train.backend=torch ships in the torch wheel; Horovod's NCCL ops are compiled
  [[ $WITH_HOROVOD == 0 ]] || command -v nvcc >/dev/null 2>&1 || [[ -n ${CUDA_HOME:-} ]] ||
    die "HVCODISTILL_GPU=1 needs a CUDA toolkit (nvcc on PATH or CUDA_HOME) to build Horovod's NCCL ops"
fi

patch_horovod() { # $1: unpacked sdist. Each edit is what Horovod 0.28.1 needs for torch >= 2.1.
  local src=$1
  # torch >= 2.1 headers need C++17 and torch 2.14's need C++20; Horovod 0.28.1 asks for C++14.
  sed -i 's/^set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 20)/' "$src/CMakeLists.txt"
  # The torch extension resets the standard to 14; raising only the top level links
  # gloo::rendezvous::Store::kDefaultTimeout twice, so raise it here as well.
  sed -i 's/^    set(CMAKE_CXX_STANDARD 14)/    set(CMAKE_CXX_STANDARD 20)/' "$src/horovod/torch/CMakeLists.txt"
  # A CUDA build of torch plus nvcc without a CUDA runtime (a CPU machine) makes Horovod look for
  # cudart and fail: HOROVOD_TORCH_FORCE_CPU=1 (opt-in, set below only for CPU builds) says no CUDA.
  sed -i '/^string(TOUPPER "${Pytorch_CUDA}" Pytorch_CUDA)$/a if("$ENV{HOROVOD_TORCH_FORCE_CPU}" STREQUAL "1")\n    set(Pytorch_CUDA FALSE)\nendif()' \
    "$src/cmake/Modules/FindPytorch.cmake"
  grep -q 'HOROVOD_TORCH_FORCE_CPU' "$src/cmake/Modules/FindPytorch.cmake" &&
  grep -q '^set(CMAKE_CXX_STANDARD 20)' "$src/CMakeLists.txt" &&
    grep -q '^    set(CMAKE_CXX_STANDARD 20)' "$src/horovod/torch/CMakeLists.txt" ||
    die "Horovod $HOROVOD_VERSION sources are not as expected: the build patches did not apply"
}

horovod_ok() { # Horovod imports with PyTorch, and was built with MPI (what --check-build says)
  "$PY" - <<'PYEOF' 2>/dev/null
import sys
import mpi4py  # noqa: F401
import horovod.torch as hvd
sys.exit(0 if hvd.mpi_built() else 1)
PYEOF
}

PATCH_ID=$(declare -f patch_horovod | sha256sum | cut -c1-12)
KEY="horovod-$HOROVOD_VERSION-torch-${TORCH_VERSION//+/_}-py$("$PY" -c 'import sys; print("%d%d" % sys.version_info[:2])')-$([[ $GPU == 1 ]] && echo nccl || echo cpu)-$PATCH_ID"
WHEEL_DIR=$CACHE/wheels/$KEY

HOROVOD_INSTALLED=0
if [[ $WITH_HOROVOD == 1 ]] && ! horovod_ok; then
  HOROVOD_INSTALLED=1
  if ! ls "$WHEEL_DIR"/horovod-*.whl >/dev/null 2>&1; then
    say "building Horovod $HOROVOD_VERSION for torch $TORCH_VERSION ($([[ $GPU == 1 ]] && echo NCCL || echo CPU) ops; a few minutes)"
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
    log "download horovod sdist" "$PY" -m pip download --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$build"
    tar -xzf "$build/horovod-$HOROVOD_VERSION.tar.gz" -C "$build"
    patch_horovod "$build/horovod-$HOROVOD_VERSION"
    hvd_env=(HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
             HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
             MAKEFLAGS="-j$(nproc)" HOROVOD_BUILD_ARCH_FLAGS="${HOROVOD_BUILD_ARCH_FLAGS:-}")
    if [[ $GPU == 1 ]]; then
      hvd_env+=(HOROVOD_GPU_OPERATIONS=NCCL)
    else
      hvd_env+=(HOROVOD_TORCH_FORCE_CPU=1 HOROVOD_CPU_OPERATIONS=MPI)
    fi
    mkdir -p "$WHEEL_DIR.tmp"
    log "build horovod wheel" env "${hvd_env[@]}" "$PY" -m pip wheel --no-deps --no-build-isolation \
      -w "$WHEEL_DIR.tmp" "$build/horovod-$HOROVOD_VERSION"
    rm -rf "$WHEEL_DIR" && mv "$WHEEL_DIR.tmp" "$WHEEL_DIR"   # the cache only ever holds whole wheels
  fi
  say "installing Horovod from $WHEEL_DIR"
  log "pip install horovod" "$PY" -m pip install --force-reinstall --no-deps "$WHEEL_DIR"/horovod-*.whl
  log "pip install horovod deps" "$PY" -m pip install cloudpickle psutil pyyaml packaging cffi
fi

# --- mpi4py and the package -----------------------------------------------------------------
"$PY" -c 'import mpi4py' 2>/dev/null || log "pip install mpi4py" "$PY" -m pip install mpi4py
if ! "$PY" -c 'import hvcodistill, pytest' 2>/dev/null ||
   [[ pyproject.toml -nt $("$PY" -c 'import sys; print(sys.prefix)')/.hvcodistill-installed ]]; then
  say "installing hvcodistill (editable) and its dependencies"
  log "pip install hvcodistill" "$PY" -m pip install -e ".[test]"
  touch "$("$PY" -c 'import sys; print(sys.prefix)')/.hvcodistill-installed"
fi

# --- verify ---------------------------------------------------------------------------------
HVDRUN=$(dirname "$PY")/horovodrun
if [[ $HOROVOD_INSTALLED == 1 ]]; then # a Horovod found in place was checked by horovod_ok above
  check=$("$HVDRUN" --check-build 2>&1) || die "horovodrun --check-build failed: $check"
  grep -q '\[X\] PyTorch' <<<"$check" || die "Horovod was built without PyTorch support (horovodrun --check-build)"
  grep -q '\[X\] MPI' <<<"$check" || die "Horovod was built without MPI support (horovodrun --check-build)"
fi
"$PY" -c 'from mpi4py import MPI; import sys; sys.exit(MPI.Query_thread() != MPI.THREAD_MULTIPLE)' ||
  die "mpi4py does not provide MPI_THREAD_MULTIPLE; rebuild MPI with thread support"
if [[ $WITH_HOROVOD == 1 ]]; then
  HOROVOD_SAYS="Horovod $HOROVOD_VERSION ($([[ $GPU == 1 ]] && echo NCCL || echo CPU) ops) with PyTorch+MPI"
else
  HOROVOD_SAYS="no Horovod (HVCODISTILL_HOROVOD=0: run with train.backend=torch)"
fi
say "ready: torch $TORCH_VERSION, $HOROVOD_SAYS, $(mpirun --version 2>/dev/null | head -1)"
