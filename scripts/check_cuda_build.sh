#!/usr/bin/env bash
# Compiles the CUDA kernels (torch-free) and the standalone self-test for sm_80 and sm_90 with nvcc, so
# CUDA code that does not compile fails CI even on machines without a GPU. Running the self-test needs
# a GPU: `build/cuda-check/selftest` prints "selftest: N passed, M failed".
# When TORCH_CUDA_INCLUDE points at the include/ folder of a CUDA build of torch, the torch launcher is
# compiled too (the CPU torch wheel lacks torch's CUDA headers).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "check_cuda_build: nvcc not found; install the CUDA toolkit or set NVCC=/path/to/nvcc" >&2
  exit 1
fi
OUT=build/cuda-check
mkdir -p "$OUT"
ARCH="-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90"
FLAGS="-std=c++17 -O3 --fmad=false -Werror all-warnings"
echo "nvcc: $($NVCC --version | tail -1)"
$NVCC $FLAGS $ARCH -c csrc/cuda/inner_update_kernel.cu -o "$OUT/inner_update_kernel.o"
$NVCC $FLAGS $ARCH -o "$OUT/selftest" csrc/cuda/selftest.cu csrc/cuda/inner_update_kernel.cu
echo "check_cuda_build: kernels and self-test compiled for sm_80 and sm_90"
if [ -n "${TORCH_CUDA_INCLUDE:-}" ]; then
  PYINC=$(${PYTHON:-python3} -c "import sysconfig; print(sysconfig.get_paths()['include'])")
  CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  g++ -std=c++20 -O1 -fPIC -c -DMETAFORMER_WITH_CUDA=1 -I"$TORCH_CUDA_INCLUDE" \
    -I"$TORCH_CUDA_INCLUDE/torch/csrc/api/include" -I"$CUDA_HOME/include" -I"$PYINC" -Icsrc \
    csrc/cuda/inner_update_launcher.cpp -o "$OUT/inner_update_launcher.o"
  echo "check_cuda_build: torch launcher compiled against $TORCH_CUDA_INCLUDE"
fi
