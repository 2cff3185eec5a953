#!/usr/bin/env bash
# Builds the `cuda` feature (candle's CUDA backend behind the engine) on a
# machine with no GPU and no CUDA toolkit, so a change to the GPU path is
# at least compiled where the tests run. NVIDIA's compiler, headers and
# libraries come from PyPI wheels: the CUDA 13 ones (`nvidia-cuda-nvcc` and
# the rest, one tree under nvidia/cu13), because the cu12 wheels ship ptxas
# but not the nvcc driver. candle's kernels are compiled to PTX for
# CUDA_COMPUTE_CAP (default 80; PTX is compiled again for newer cards when
# loaded). Nothing here runs on a GPU, and nothing is linked (see below).
#   scripts/cuda-check.sh [cargo build arguments...]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${CUDA_VENV:-target/cuda-venv}
if ! "$venv/bin/python3" -c "import nvidia" 2>/dev/null; then
  echo "installing NVIDIA's CUDA 13 compiler, headers and libraries from PyPI into $venv (about 1.2 GB)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet nvidia-cuda-nvcc==13.5.37 nvidia-cuda-runtime==13.5.37 \
    nvidia-cuda-nvrtc==13.5.37 nvidia-cuda-cccl==13.3.5.0.6 nvidia-cublas==13.10.0.20 nvidia-curand==10.4.5.25
fi
root=$("$venv/bin/python3" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
export CUDA_ROOT=$root CUDA_PATH=$root CUDA_HOME=$root
export PATH=$root/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}
# cudarc 0.19.10 knows CUDA up to 13.4 and refuses the 13.5 compiler's
# version by name; its 13.4 bindings (loaded at run time) are used.
export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13040}
echo "nvcc: $(nvcc --version | tail -1); compute capability $CUDA_COMPUTE_CAP"
# Every crate of the binary, compiled with the feature (candle's kernels by
# nvcc included); the executable itself is not linked: it links against
# libcuda, which comes with NVIDIA's driver (or the full toolkit's stubs),
# and no PyPI wheel ships it.
cargo build -p flywheel --lib --features cuda "$@"
echo "compiled: every crate of flywheel with the cuda feature (not linked: no libcuda here)"
