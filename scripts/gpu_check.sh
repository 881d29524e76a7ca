#!/usr/bin/env bash
# Every GPU measurement in one call: DiT-XL/2 (random weights), DDIM-50, CFG 1.5. Writes the
# benchmark JSON files and logs under $OUT (default results/bench). Ordered by priority, each
# part under its own time limit, so a slow compile cannot take the other figures with it.
set -u
OUT=${OUT:-results/bench}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/.pydeps:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" >> "$OUT/gpu.txt" 2>&1
B=(python3 scripts/bench_latency.py model=dit-xl device=cuda "out_dir=$OUT")
PARTS=${PARTS:-"1 2 3"}
# 1-2. the targets: bf16, torch.compile, batch 16 and 64: step fractions and NFC-14 end to end
[[ $PARTS == *1* ]] && timeout "${T1:-270}" "${B[@]}" batch_sizes=[16] precisions=[bf16] compile=true \
  end_to_end=true repeats=10 e2e_repeats=2 2>&1 | tee "$OUT/xl_b16_bf16_compile.log"
[[ $PARTS == *2* ]] && timeout "${T2:-190}" "${B[@]}" batch_sizes=[64] precisions=[bf16] compile=true \
  end_to_end=true repeats=10 e2e_repeats=2 2>&1 | tee "$OUT/xl_b64_bf16_compile.log"
# 3. eager paths (the naive anchor's setting): bf16 and TF32, batch 16, steps only
[[ $PARTS == *3* ]] && timeout "${T3:-90}" "${B[@]}" batch_sizes=[16] precisions=[bf16,tf32] compile=false \
  repeats=10 2>&1 | tee "$OUT/xl_b16_eager.log"
ls -la "$OUT"
