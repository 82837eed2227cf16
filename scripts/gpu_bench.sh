#!/usr/bin/env bash
# The prepared GPU run of `imptome bench speed`, for a lent GPU machine (see docs/RESULTS.md, "Speed").
#
# Here, once:   bash scripts/gpu_wheels.sh                      (wheels into the git-ignored .whl/)
# There:        device run, carry [".whl"], timeout_s 600:   bash scripts/gpu_bench.sh
#
# Installs diffusers, tomesd, DeepCache and imptome from .whl/ (the machine has PyTorch but no package
# index), then, most important first: the CUDA-only tests, the efficiency targets (SD2 and PixArt-alpha at
# 1024 px, fp16, SDPA), profiles of the SD2 and PixArt steps, torch.compile (COMPILE=1), DeepCache stacking,
# SDXL and 512 px. Each
# stage has its own time limit (about 10 minutes in all; TARGETS_ONLY=1 stops after the profiles) and every case is
# written as soon as it is measured, so a run cut short still returns what it got. Results go to $OUT (the
# device tool's folder) or ./out/gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site
exec > >(tee "$OUT/run.log") 2>&1   # at most 8 files come back: one log, one JSON per stage
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 -c "import torch, diffusers, imptome; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'imptome', imptome.__version__)" \
    || exit 1

# Markdown tables go to /tmp/md (rebuilt from the JSON here); progress goes to the log.
bench="python3 -m imptome bench speed --device cuda --dtype float16 --attention sdpa"  # a variable: timeout runs no functions
md() { echo "--markdown /tmp/md/$1.md --json $OUT/$1.json"; }
mkdir -p /tmp/md
# 1. CUDA-only checks (no host sync per layer, offload to the GPU, fp16, Inductor vs eager); SKIP_TESTS=1 skips.
[ -n "${SKIP_TESTS:-}" ] || timeout 150 python3 -m pytest -q -p no:cacheprovider -p no:logging tests/patch/test_cuda.py
# 2. The targets: SD2 and PixArt-alpha at 1024 px, ratios 0.5 and 0.7, 7 alternating rounds.
timeout 200 $bench --arch sd2 pixart-alpha --res 1024 --ratios 0.5 0.7 --variants none tome importance tomesd \
    --rounds 7 $(md speed_gpu_1024)
# 3. Where the time goes in a merged step, and inside planning (torch.profiler).
for arch in sd2 pixart-alpha; do
    timeout 60 python3 scripts/profile_step.py --arch $arch --res 1024 --out "$OUT/profile_${arch}_1024.txt" > /dev/null
done
# 3b. With COMPILE=1: torch.compile, unmerged vs merged, eager for reference (about 3 + 1.5 minutes).
if [ -n "${COMPILE:-}" ]; then
    for arch in sd2 pixart-alpha; do
        timeout 240 python3 scripts/compile_speed.py --arch $arch --res 1024 --calls 10 --json "$OUT/compile_${arch}_1024.json"
    done
fi
[ -n "${TARGETS_ONLY:-}" ] && { cat /tmp/md/*.md; exit 0; }  # stages 1-3 only (about 8 minutes)
# 4. Stacking: whole 20-step SD2 generations at 1024 px with imptome, DeepCache and both.
timeout 90 $bench --arch sd2 --res 1024 --ratios 0.7 --variants none importance --rounds 3 --generation-steps 20 \
    $(md generation_gpu)
# 5. SDXL and the 512 px cases, for as long as the run has left.
timeout 60 $bench --arch sdxl sd15 --res 1024 512 --ratios 0.7 --rounds 5 $(md speed_gpu_more)
cat /tmp/md/*.md
