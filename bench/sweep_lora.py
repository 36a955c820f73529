"""Time every config of the LoRA kernels' spaces at one shape (GPU only).

    python -m posttrain_kernels.bench.sweep_lora [--M 8192 --K 4096 --N 4096 --r 16]

Prints, per kernel and layout, each config's median time next to the
default pick and ``F.linear``; the tuner of the autotune package builds on
the same loop. Each config is pinned through its environment variable.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
import triton.testing

from ..autotune.config import Config, pin_variable, rank_block
from ..autotune.lora import LORA_GRAD, LORA_MATMUL, LORA_SHRINK
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
    "lora_grad": [
        dict(BLOCK_M=128, BLOCK_P=64, num_warps=4, num_stages=3),
        dict(BLOCK_M=64, BLOCK_P=64, num_warps=4, num_stages=4),
    ],
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
    dt = L.lora_shrink(dy, b.t(), 2.0)
    cases = {
        "lora_matmul fwd": ("lora_matmul", lambda: L.lora_matmul(x, w, t, b, None, 2.0), LORA_MATMUL.configs(dn, cc)),
        "lora_matmul dx": ("lora_matmul", lambda: L.lora_matmul(dy, w.t(), dt, a.t(), None, 1.0),
                           LORA_MATMUL.configs(dn, cc)),
        "lora_shrink x": ("lora_shrink", lambda: L.lora_shrink(x, a, 1.0), LORA_SHRINK.configs(dn, cc, rank_block(r))),
        "lora_shrink dy": ("lora_shrink", lambda: L.lora_shrink(dy, b.t(), 2.0),
                           LORA_SHRINK.configs(dn, cc, rank_block(r))),
        "lora_grad dB": ("lora_grad", lambda: L.lora_grad(dy, t, 2.0), LORA_GRAD.configs(dn, cc, rank_block(r))),
        "lora_grad dA": ("lora_grad", lambda: L.lora_grad(x, dt, 1.0, transpose_out=True),
                         LORA_GRAD.configs(dn, cc, rank_block(r))),
    }
    rows = [{"case": "F.linear fwd", "config": None, "ms": _time(lambda: F.linear(x, w))},
            {"case": "F.linear dx", "config": None, "ms": _time(lambda: F.linear(dy, w.t()))}]
    for case, (kernel, fn, space) in cases.items():
        var = pin_variable(kernel)
        rows.append({"case": case, "config": "default", "ms": _time(fn)})
        for cfg in list(space) + [Config.from_dict(d) for d in CANDIDATES[kernel]]:
            os.environ[var] = json.dumps(cfg.to_dict())
            try:
                rows.append({"case": case, "config": cfg.to_dict(), "ms": _time(fn)})
            except Exception as e:  # an out-of-resource config is a result, not a crash
                rows.append({"case": case, "config": cfg.to_dict(), "ms": None, "error": str(e)[:200]})
            finally:
                del os.environ[var]
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
