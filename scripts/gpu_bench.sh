#!/usr/bin/env bash
# The prepared GPU run of `imptome bench speed`, for a lent GPU machine (see docs/RESULTS.md, "Speed").
#
# Here, once:   bash scripts/gpu_wheels.sh                      (wheels into the git-ignored .whl/)
# There:        device run, carry [".whl"], timeout_s 590:   bash scripts/gpu_bench.sh
#
# Installs diffusers, tomesd, DeepCache and imptome from .whl/ (the machine has PyTorch but no package
# index), then times every architecture in fp16 with SDPA. Results go to $OUT (the device tool's folder
# that comes back) or ./out/gpu. Estimated (not yet run): 1 min of tests + about 5 min of benchmarks on an
# H100; results are written after every case, so a run cut short still returns what it measured.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, imptome; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'imptome', imptome.__version__)" | tee -a "$OUT/gpu.txt"

# CUDA-only checks first (no host sync per layer, offload to the GPU, fp16, Inductor): about a minute.
python3 -m pytest -q -p no:cacheprovider tests/patch/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log" || true

bench() { python3 -m imptome bench speed --device cuda --dtype float16 --attention sdpa "$@"; }
# Step time: every architecture, ratios 0.5 and 0.7, 10 alternating rounds.
bench --arch sd15 sd2 sdxl pixart-alpha animatediff --ratios 0.5 0.7 --rounds 10 --json "$OUT/speed_gpu.json" \
    2> "$OUT/speed_gpu.log"
# Stacking: whole 20-step generations with imptome, DeepCache and both (SD2 at 1024 px).
bench --arch sd2 --res 1024 --ratios 0.7 --variants none --rounds 5 --generation-steps 20 \
    --json "$OUT/generation_gpu.json" 2> "$OUT/generation_gpu.log"
cat "$OUT/speed_gpu.md" "$OUT/generation_gpu.md"
