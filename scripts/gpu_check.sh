#!/usr/bin/env bash
# GPU readiness in one command, on a CUDA machine where trident is already installed
# (this script installs nothing). It prints tokens/s, TFLOP/s and MFU against the
# declared peak of the device for a Llama-1B-shaped step in bf16 at (1,1,1), eager and
# compiled, then runs the test that fails on any host-device synchronisation inside the
# forward/backward (torch.cuda.set_sync_debug_mode("error")).
#
#   bash scripts/gpu_check.sh            # from the repository root
#   STEPS=20 bash scripts/gpu_check.sh   # more timed steps
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: gpu_check needs one')"
STEPS="${STEPS:-10}"
COMMON=(--config configs/llama-1b.yaml --steps "$STEPS" --warmup 3 --no-reference --no-transformers
        train.micro_batch_size=2 train.global_batch_size=2 data.seq_len=4096 train.recompute=none)
echo "== eager, bf16, SDPA (document masking on) =="
trident bench train "${COMMON[@]}" train.compile=false
echo "== compiled blocks, bf16 =="
trident bench train "${COMMON[@]}" train.compile=true
echo "== no host-device sync in the step =="
python -m pytest -q tests/test_cuda_sync.py
