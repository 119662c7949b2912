#!/bin/bash
# Everything a lent GPU session measures, in one command of under 10 minutes (device time is short):
# the GPU-sensitive tests, the CUDA twins of the decode-step kernels against the ops step, then
# bench/shapes.py at the Llama-3.2-1B shape (ops path, then the fused kernels where their test
# passed) and the Mistral-7B shape as QLoRA with lora-train. Results and logs go to $OUT (or
# bench/results). Staged as ../shared/gpu/README.md says; try it on the CPU first with SMALL=1.
#   bash .gpu/N/keep.sh && source .gpu/N/env.sh && bash bench/gpu_session.sh
set -u
out=${OUT:-bench/results}; mkdir -p "$out"
small=${SMALL:-0}
step() {  # name, seconds, command...: run with a limit, log to $out/name.log, never stop the session
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"; start=$(date +%s)
  timeout "$limit" "$@" > "$out/$name.log" 2>&1; status=$?
  echo "   exit $status after $(( $(date +%s) - start ))s"; tail -3 "$out/$name.log"
  return $status
}
export MLX_ENABLE_TF32=0
python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device())" | tee "$out/device.txt"
step tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_device_ops.py tests/test_step_kernels.py \
  tests/test_model.py tests/test_lolcats.py tests/test_sparse.py tests/test_decode_step.py tests/test_scan.py tests/test_fastmath.py
step cuda_kernels 60 python3 -m pytest -q -p no:cacheprovider tests/test_step_kernels.py -k on_this_gpu && grep -q " passed" "$out/cuda_kernels.log" && fused=1 || fused=0
if [ "$small" = 1 ]; then
  shape=(--shape tiny --contexts 256,1024 --batch 4 --batch-context 256 --prefill-step 256 --decode-tokens 8)
  qlora=(--shape tiny --contexts 256 --batch 0 --train --seq-len 128 --updates 1)
else
  shape=(--shape 1b --contexts 1024,16384,65536 --batch 16 --batch-context 16384)
  qlora=(--shape 7b --contexts 1024 --batch 0 --train --seq-len 2048 --updates 2)
fi
MLX_LINEAR_KERNELS=0 step shapes_ops 180 python3 bench/shapes.py "${shape[@]}" --recipes chat,liger-gla
[ "$fused" = 1 ] && MLX_LINEAR_KERNELS=cuda step shapes_fused 120 python3 bench/shapes.py "${shape[@]}" --recipes chat,liger-gla --batch 0 --tag fused
step qlora_7b 150 python3 bench/shapes.py "${qlora[@]}" --quantize --recipes chat,liger-gla
cp bench/results/shapes_*.json "$out/" 2>/dev/null
echo "done: $(ls "$out")"
