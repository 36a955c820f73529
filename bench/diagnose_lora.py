"""Where the time of one fused-LoRA fwd+bwd goes (GPU only): per-kernel CUDA
times from the profiler, and host enqueue time against device time, which
tells whether the step is launch-bound.

    python -m posttrain_kernels.bench.diagnose_lora [--M 8192 --K 4096 --N 4096 --r 16]
"""
from __future__ import annotations

import argparse
import time

import torch

from . import lora as B


def main(argv=None):
    ap = argparse.ArgumentParser()
    for name, default in (("M", 8192), ("K", 4096), ("N", 4096), ("r", 16)):
        ap.add_argument(f"--{name}", type=int, default=default)
    args = ap.parse_args(argv)
    s = B.LoRAShape(args.M, args.K, args.N, args.r)
    inputs = B.make_inputs(s, torch.device("cuda"))
    for provider in ("linear", "eager", "ours"):
        fn = B.provider_fn(provider, "fwd+bwd", s, inputs)
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        n = 30
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        print(f"{provider:7s} fwd+bwd: host enqueue {1e3 * (t1 - t0) / n:.3f} ms/iter, "
              f"wall {1e3 * (t2 - t0) / n:.3f} ms/iter")
    fn = B.provider_fn("ours", "fwd+bwd", s, inputs)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
