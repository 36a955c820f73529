"""Time every config of the LoRA kernels' spaces at one shape (GPU only).

    python -m posttrain_kernels.bench.sweep_lora [--M 8192 --K 4096 --N 4096 --r 16]

Prints, per kernel and layout, each config's median time next to the
default pick and ``F.linear``; the tuner of the autotune package builds on
the same loop. Each config is pinned through its environment variable.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton.testing

from ..autotune.cache import env_override
from ..autotune.config import Config, pin_variable
from ..autotune.lora import LORA_DY, LORA_MATMUL, LORA_MATMUL_TMA, LORA_SHRINK, LORA_X
from ..ops.backend import compute_capability
from ..ops.common import dtype_name
from ..ops.lora import launch as L


# Candidates outside the shipped spaces, timed next to them to decide what
# the spaces should hold.
CANDIDATES = {
    "lora_matmul": [
        dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
        dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=16, num_warps=8, num_stages=3),
    ],
    "lora_shrink": [
        dict(BLOCK_M=32, BLOCK_K=128, num_warps=4, num_stages=3),
        dict(BLOCK_M=64, BLOCK_K=128, num_warps=8, num_stages=3),
        dict(BLOCK_M=32, BLOCK_K=64, num_warps=4, num_stages=4),
        dict(BLOCK_M=16, BLOCK_K=128, num_warps=4, num_stages=4),
    ],
    "lora_matmul_tma": [
        dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
    ],
    "lora_dy": [dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4)],
    "lora_x": [dict(BLOCK_M=64, BLOCK_K=32, BLOCK_N=128, num_warps=4, num_stages=4)],
}


def _time(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def sweep(M, K, N, r, dtype=torch.bfloat16):
    dev = torch.device("cuda")
    cc = compute_capability(dev)
    dn = dtype_name(dtype)
    x = torch.randn(M, K, device=dev, dtype=dtype)
    w = torch.randn(N, K, device=dev, dtype=dtype) / K ** 0.5
    a = torch.randn(r, K, device=dev, dtype=dtype) / K ** 0.5
    b = torch.randn(N, r, device=dev, dtype=dtype) / r ** 0.5
    dy = torch.randn(M, N, device=dev, dtype=dtype)
    t = L.lora_shrink(x, a, 1.0)

    def bwd(i):
        return lambda: L.lora_bwd_triton(dy, x, w, a, b, t, 2.0, 0.0, None, i == 0, False)[i]

    gemm = LORA_MATMUL_TMA if cc >= 90 else LORA_MATMUL
    cases = {  # each times the step its kernel belongs to, the other kernels at their picks
        "fwd (one step)": (gemm.name, lambda: L.lora_fwd_triton(x, w, a, b, None, 2.0, 0.0, None)[0],
                           gemm.configs(dn, cc)),
        "dx (bwd step)": (gemm.name, bwd(0), gemm.configs(dn, cc)),
        "lora_shrink x": ("lora_shrink", lambda: L.lora_shrink(x, a, 1.0),
                          LORA_SHRINK.configs(dn, cc, LORA_SHRINK.block_r(r))),
        "dY pass (dB)": ("lora_dy", bwd(2), LORA_DY.configs(dn, cc, LORA_DY.block_r(r))),
        "x pass (dA)": ("lora_x", bwd(1), LORA_X.configs(dn, cc, LORA_X.block_r(r))),
    }
    rows = [{"case": "F.linear fwd", "config": None, "ms": _time(lambda: F.linear(x, w))},
            {"case": "F.linear dx", "config": None, "ms": _time(lambda: F.linear(dy, w.t()))}]
    for case, (kernel, fn, space) in cases.items():
        var = pin_variable(kernel)
        rows.append({"case": case, "config": "default", "ms": _time(fn)})
        for cfg in list(space) + [Config.from_dict(d) for d in CANDIDATES[kernel]]:
            with env_override(var, json.dumps(cfg.to_dict())):  # pinned, the plans rebuilt
                try:
                    rows.append({"case": case, "config": cfg.to_dict(), "ms": _time(fn)})
                except Exception as e:  # an out-of-resource config is a result, not a crash
                    rows.append({"case": case, "config": cfg.to_dict(), "ms": None, "error": str(e)[:200]})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    for name, default in (("M", 8192), ("K", 4096), ("N", 4096), ("r", 16)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = sweep(args.M, args.K, args.N, args.r)
    for row in rows:
        ms = f"{row['ms']:.4f}" if row["ms"] is not None else "FAIL " + row.get("error", "")
        print(f"{row['case']:16s} {ms:>10s}  {row['config']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
