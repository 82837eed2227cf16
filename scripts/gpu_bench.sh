#!/usr/bin/env bash
# The prepared GPU runs of imptome's benchmarks, for a lent GPU machine (see docs/RESULTS.md, "Speed").
#
# Here, once:   bash scripts/gpu_wheels.sh                      (wheels into the git-ignored .whl/)
# There:        device run, carry [".whl"], timeout_s 600:   STAGES="..." bash scripts/gpu_bench.sh
#
# Installs diffusers, tomesd, DeepCache and imptome from .whl/ (the machine has PyTorch but no package
# index), then runs the stages named in STAGES, in the order named (default: the benchmark, "targets profiles
# deepcache more", under 8 minutes by the stages' time limits; add "tests" for the CUDA-only tests):
#   tests     the CUDA-only tests (no host sync per layer, offload to the GPU, fp16, Inductor vs eager)
#   targets   the efficiency targets: SD2 and PixArt-alpha at 1024 px, fp16, SDPA, ratios 0.5 and 0.7
#   profiles  torch.profiler summaries of the SD2 and PixArt steps and of planning alone
#   compile   torch.compile, unmerged vs merged, default mode and CUDA graphs (about 8 minutes; narrow it
#             with COMPILE_ARCHS="sd2" and COMPILE_MODES="reduce-overhead", both lists)
#   prop      proportional attention (an additive SDPA mask): each SDPA backend with and without the mask at
#             the merged shapes (scripts/sdpa_bias.py), then against plain importance, 1024 px, ratio 0.7
#   layout    SD2 at 1024 px with the UNet and latent in channels_last (NHWC) against contiguous, same
#             machine: the unmerged step spends time converting layouts around cuDNN convolutions, which
#             merging cannot remove and which lowers its efficiency
#   deepcache whole 20-step SD2 generations with imptome, DeepCache and both
#   more      SDXL and the 512 px cases
#   video     Stable Video Diffusion's UNet, 14 frames at 768 px square (SVD's native 9216 tokens a frame)
#   sd3       SD3 Medium's transformer at 1024 px (joint attention over 4096 image and 333 text tokens)
#   merge     ways to compute the merge (embedding_bag as shipped, index_add, segment_reduce, sparse CSR, a
#             Triton kernel, compiled), timed alone at the SD2, PixArt and SD3 1024 px shapes
#             (scripts/merge_kernels.py, at most 3 minutes)
#   planning  planning alone, eager against replayed from a CUDA graph, SD2 and PixArt-alpha at 1024 px
#             (scripts/planning_graph.py): what a graphed planner could save an eager step
#   quality16 the bundled model's quality benchmark on the GPU in float32 and in float16 (2 seeds, ratios 0.5
#             and 0.7, none / tome / importance): whether fp16 plans cost fidelity on a trained model
#   triton    the Triton merge kernel (merge_kernel "auto", the default since 0.8.0, or "triton"): its tests
#             (the kernel against embedding_bag, CUDA graphs with it), then PixArt-alpha at 1024 px
#             compiled with CUDA graphs, importance with either merge kernel (about 5 minutes with the
#             tests; TRITON_ARCHS="pixart-alpha sd2" adds SD2, about 4 more; TRITON_TESTS=0 leaves the tests
#             out). 0.7.2's run on an H200: tests 127 s, PixArt-alpha 155 s, SD2 215 s
# Each stage has its own time limit and every case is written as soon as it is measured, so a run cut short
# still returns what it got. Results go to $OUT (the device tool's folder) or ./out/gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu}"
STAGES="${STAGES:-targets profiles deepcache more}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site
exec > >(tee "$OUT/run.log") 2>&1   # few files come back: one log, one JSON per case
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 -c "import torch, triton, diffusers, imptome; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, 'imptome', imptome.__version__)" \
    || exit 1
echo "stages: $STAGES"

# Markdown tables go to /tmp/md (rebuilt from the JSON here); progress goes to the log.
bench="python3 -m imptome bench speed --device cuda --dtype float16 --attention sdpa"  # a variable: timeout runs no functions
md() { echo "--markdown /tmp/md/$1.md --json $OUT/$1.json"; }
mkdir -p /tmp/md
stage_tests() {
    # 14 tests, more than 300 s: on an H100 9 of them took 243 s with 0.6.2 (the two CUDA-graph tests 220 s);
    # on an H200 one CUDA-graph test took about 2 minutes and one Inductor test up to 3 (0.7.2 and 0.8.0)
    # TESTS_K: a pytest -k expression to run some of them; TESTS_TIMEOUT: seconds (default 300)
    timeout "${TESTS_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -p no:logging tests/patch/test_cuda.py ${TESTS_K:+-k "$TESTS_K"}
}
stage_targets() {  # 7 alternating rounds
    timeout 200 $bench --arch sd2 pixart-alpha --res 1024 --ratios 0.5 0.7 --variants none tome importance tomesd \
        --rounds 7 $(md speed_gpu_1024)
}
stage_profiles() {
    for arch in sd2 pixart-alpha; do
        timeout 60 python3 scripts/profile_step.py --arch $arch --res 1024 --out "$OUT/profile_${arch}_1024.txt" > /dev/null
    done
}
stage_compile() {
    for mode in ${COMPILE_MODES:-default reduce-overhead}; do
        for arch in ${COMPILE_ARCHS:-sd2 pixart-alpha}; do
            # SD2 on an H100: about 60 s of compiling per variant
            timeout 200 python3 scripts/compile_speed.py --arch $arch --res 1024 --calls 10 --mode $mode \
                --variants none importance --profile-calls 5 --json "$OUT/compile_${arch}_1024_${mode}.json"
        done
    done
}
stage_prop() {  # the SDPA kernels alone first (seconds), then the whole step
    timeout 60 python3 scripts/sdpa_bias.py --device cuda --dtype float16 --json "$OUT/sdpa_bias.json"
    timeout 150 $bench --arch sd2 pixart-alpha --res 1024 --ratios 0.7 --variants none importance importance-prop \
        --rounds 5 $(md speed_gpu_prop)
}
stage_layout() {
    for memory_format in contiguous channels_last; do
        timeout 60 $bench --arch sd2 --res 1024 --ratios 0.7 --variants none tome importance --rounds 7 \
            --memory-format $memory_format $(md speed_gpu_sd2_1024_$memory_format)
    done
}
stage_deepcache() {
    timeout 90 $bench --arch sd2 --res 1024 --ratios 0.7 --variants none importance --rounds 3 --generation-steps 20 \
        $(md generation_gpu)
}
stage_more() {
    timeout 60 $bench --arch sdxl sd15 --res 1024 512 --ratios 0.7 --rounds 5 $(md speed_gpu_more)
}
stage_video() {
    timeout 120 $bench --arch svd --res 768 --frames 14 --ratios 0.5 --variants none tome importance --rounds 5 \
        $(md speed_gpu_svd)
}
stage_sd3() {
    timeout 90 $bench --arch sd3 --res 1024 --ratios 0.5 0.7 --variants none tome importance --rounds 5 \
        $(md speed_gpu_sd3)
}
stage_merge() {
    timeout 180 python3 scripts/merge_kernels.py --device cuda --dtype float16 --json "$OUT/merge_kernels.json"
}
stage_planning() {
    for arch in sd2 pixart-alpha; do
        timeout 90 python3 scripts/planning_graph.py --arch $arch --res 1024 --json "$OUT/planning_graph_${arch}.json"
    done
}
stage_quality16() {  # each dtype's PSNR is against its own unmerged images
    for dtype in float32 float16; do
        timeout 150 python3 -m imptome bench quality --device cuda --dtype $dtype --seeds 2 --ratios 0.5 0.7 \
            --methods none tome importance --cache /tmp/quality_$dtype --json "$OUT/quality_cuda_$dtype.json"
    done
}
stage_triton() {  # TRITON_TESTS=0 skips the tests
    # the kernel against embedding_bag and CUDA graphs with the default merge kernel (127 s on an H200). The
    # Inductor tests use it too, but take longer: STAGES=tests TESTS_K=inductor (the first of the two passed
    # within 3 minutes on an H200, the second was cut at 200 s)
    [ "${TRITON_TESTS:-1}" = 0 ] || timeout 240 python3 -m pytest -q -p no:cacheprovider -p no:logging \
        tests/patch/test_cuda.py -k "segment_mean or (replay and auto)"
    for arch in ${TRITON_ARCHS:-pixart-alpha}; do
        # compiling takes 35-45 s per variant for PixArt-alpha, 50-70 s for SD2 (0.7.2 on an H200), and
        # the JSON is written at the end
        limit=$([ "$arch" = sd2 ] && echo 330 || echo 240)
        timeout $limit python3 scripts/compile_speed.py --arch $arch --res 1024 --calls 10 --mode reduce-overhead \
            --variants none importance-embedding-bag importance --profile-calls 5 --json "$OUT/compile_triton_${arch}_1024.json"
    done
}
for stage in $STAGES; do
    if declare -F "stage_$stage" > /dev/null; then
        echo "== stage $stage, $(date +%T)"
        "stage_$stage"
    else
        echo "== unknown stage $stage (skipped)"
    fi
done
echo "== done, $(date +%T)"
cat /tmp/md/*.md 2>/dev/null
