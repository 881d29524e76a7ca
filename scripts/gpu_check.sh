#!/usr/bin/env bash
# Every GPU measurement in one call: DiT-XL/2 (random weights) 256 px, DDIM-50, CFG 1.5, bf16
# weights. Writes the benchmark JSON files and logs under $OUT (default results/bench). Ordered by
# priority, each part under its own time limit, so a slow compile cannot take the other figures
# with it (a stopped part keeps the JSON it wrote: the benchmark saves after every figure).
set -u
OUT=${OUT:-results/bench}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/.pydeps:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1  # .pydeps: packages carried to a bare machine
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" >> "$OUT/gpu.txt" 2>&1
B=(python3 scripts/bench_latency.py model=dit-xl device=cuda "out_dir=$OUT" precisions=[bf16] e2e_repeats=3)
PARTS=${PARTS:-"1 2 3"}
# 1-2. the targets: bf16 weights + torch.compile (+ CUDA graphs for cached steps), 16 and 64 images
[[ $PARTS == *1* ]] && timeout "${T1:-330}" "${B[@]}" batch_sizes=[16] variants=[compiled] \
  methods=[fora,taylorseer,rfc] 2>&1 | tee "$OUT/xl_b16_bf16_compiled.log"
[[ $PARTS == *2* ]] && timeout "${T2:-240}" "${B[@]}" batch_sizes=[64] variants=[compiled] \
  methods=[fora,taylorseer,rfc] 2>&1 | tee "$OUT/xl_b64_bf16_compiled.log"
# 3. eager (no compile), 16 images, all methods with ToCa: what compile and CUDA graphs buy
[[ $PARTS == *3* ]] && timeout "${T3:-120}" "${B[@]}" batch_sizes=[16] variants=[eager] \
  2>&1 | tee "$OUT/xl_b16_bf16_eager.log"
# 4. (PARTS=4) FLUX.1-dev shapes with random weights (nothing to download on the GPU machine), 1024 px,
# 50 steps, bf16, one image per batch: full compute and TaylorSeer N=4 m=2 (NFC 14), rows in $OUT/flux_runs.csv
[[ $PARTS == *4* ]] && timeout "${T4:-420}" python3 run.py -m model=flux-dev model.pretrained=false eval=latency \
  eval.num_samples=3 eval.batch_size=1 device=cuda +variant=flux_full,flux_ts4_m2 \
  "paths.runs_csv=$OUT/flux_runs.csv" "paths.outputs=$OUT/outputs" 2>&1 | tee "$OUT/flux_dev_latency.log"
# 5. (PARTS=5) HunyuanVideo shapes with random weights and VAE (nothing to download), 544x960, 17 frames
# (10,200 image tokens), 50 steps, bf16, one video per batch: full compute and TaylorSeer N=6 m=1 (NFC 9),
# rows in $OUT/hunyuan_runs.csv
[[ $PARTS == *5* ]] && timeout "${T5:-540}" python3 run.py -m model=hunyuan-video model.pretrained=false \
  eval=latency eval.num_samples=2 eval.batch_size=1 device=cuda +variant=hv_full,hv_ts6_m1 \
  "paths.runs_csv=$OUT/hunyuan_runs.csv" "paths.outputs=$OUT/outputs" 2>&1 | tee "$OUT/hunyuan_video_latency.log"
# 6. (PARTS=6) the batch-invariant numerics (batch_invariant=N) on DiT-XL/2 shapes, tf32, DDIM-20: loop time
# against the default numerics at batches 1 and 16, and whether 4 samples drawn alone equal them in the batch
[[ $PARTS == *6* ]] && timeout "${T6:-240}" python3 scripts/bench_invariance.py model=dit-xl model.pretrained=false \
  device=cuda precision=tf32 sampler.num_steps=20 batch_sizes=[1,16] tiles=[8192] methods=[none,fbcache] \
  "out_dir=$OUT" 2>&1 | tee "$OUT/invariance_xl.log"
ls -la "$OUT"
