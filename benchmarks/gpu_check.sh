#!/usr/bin/env bash
# The CUDA checks in one command, for a person handed a machine with a GPU:
#   1. tests/test_cuda.py: base-model forward and whole EFTNet episodes on CUDA equal the CPU
#      (float32, TF32 off), meta_test.py on a demo fold with `device cuda`, and torchrun with
#      2 processes sharing one GPU equal to one process;
#   2. the EFTNet benchmark at 473 px on CUDA (MSANet and BAM, ResNet-50 and VGG, 1- and 5-shot).
# Usage: bash benchmarks/gpu_check.sh [more bench_eftnet options]   (from anywhere; under 5 minutes)
set -uo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device'}")
PY
python -m pytest -q -rs tests/test_cuda.py 2>&1 | tail -15
tests=${PIPESTATUS[0]}
python -m benchmarks.bench_eftnet --device cuda --sizes 473 --backbones resnet50 vgg --shots 1 5 \
  --archs MSANet BAM --repeats 3 --direct "$@"
bench=$?
echo "gpu_check: tests exit $tests, benchmark exit $bench"
exit $(( tests != 0 || bench != 0 ))
