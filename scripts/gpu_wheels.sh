#!/usr/bin/env bash
# Build the wheels that scripts/gpu_bench.sh installs on a lent GPU machine (which has PyTorch, transformers
# and accelerate but not diffusers, tomesd, DeepCache or imptome, and cannot reach a package index).
# Run here, in the repository root. The wheels go to .whl/, which git ignores through .git/info/exclude;
# carry it with the device call (carry: [".whl"]). All of these are pure-Python wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
# Versions as pinned for CI; importlib_metadata is a diffusers dependency missing from the GPU image.
python -m pip wheel -q --no-deps -w .whl diffusers==0.42.1 tomesd==0.1.3 DeepCache==0.1.1 importlib_metadata
python -m pip wheel -q --no-deps -w .whl .
ls -la .whl
du -sh .whl
