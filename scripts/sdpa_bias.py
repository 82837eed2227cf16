"""What proportional attention's additive mask costs SDPA: each backend, with and without the mask.

    python scripts/sdpa_bias.py --device cuda --dtype float16 --json sdpa_bias.json

Merged self-attention at the shapes of the speed benchmark's 1024 px cases at ratio 0.7 (SD2's top level:
16384 tokens, 5 heads of 64; PixArt-alpha: 4096 tokens, 16 heads of 72; CFG batch 2), the query and key
count K = N - floor(0.7 N), and the unmerged N for scale. The mask is what imptome passes: [B, 1, K] log
group sizes, in the queries' dtype, expanded over heads as diffusers' processor does. Every backend runs
pinned (torch.nn.attention.sdpa_kernel); "default" is SDPA's own choice. A backend that cannot take the
inputs is reported as such. Times are CUDA-event medians over --iters calls after a warm-up.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

CASES = {"sd2-1024": (16384, 5, 64), "pixart-alpha-1024": (4096, 16, 72)}  # tokens, heads, head dim
BACKENDS = {
    "default": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def median_ms(fn, iters: int, device: torch.device) -> float:
    fn()  # warm-up (and the error, if the backend cannot run)
    if device.type != "cuda":
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[len(times) // 2]
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--ratio", type=float, default=0.7)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the token counts (CPU smoke runs)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    generator = torch.Generator(device).manual_seed(0)
    rows = []
    for case, (full_tokens, heads, head_dim) in CASES.items():
        full_tokens = max(16, int(full_tokens * args.scale))
        kept = full_tokens - math.floor(full_tokens * args.ratio)
        sizes = torch.randint(1, 8, (2, 1, kept), generator=generator, device=device)
        mask = sizes.float().log().to(dtype).unsqueeze(1).expand(2, heads, 1, kept)  # [B, H, 1, K]
        for tokens, masked in ((full_tokens, False), (kept, False), (kept, True)):
            shape = (3, 2, heads, tokens, head_dim)
            q, k, v = torch.randn(shape, generator=generator, device=device, dtype=dtype)
            sdpa = F.scaled_dot_product_attention
            call = functools.partial(sdpa, q, k, v, attn_mask=mask if masked else None)
            for name, backend in BACKENDS.items():
                row = {"case": case, "tokens": tokens, "mask": masked, "backend": name, "device": str(device)}
                try:
                    if backend is None:
                        row["ms"] = median_ms(call, args.iters, device)
                    else:
                        with sdpa_kernel(backend):
                            row["ms"] = median_ms(call, args.iters, device)
                except RuntimeError as error:
                    row["ms"], row["error"] = None, str(error).splitlines()[0][:120]
                rows.append(row)
                shown = f"{row['ms']:.3f} ms" if row["ms"] is not None else f"cannot run ({row['error']})"
                print(f"{case:18} tokens {tokens:6} mask {masked!s:5} {name:9} {shown}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"dtype": args.dtype, "ratio": args.ratio, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
