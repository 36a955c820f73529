"""Host (CPU) time of one fused-LoRA fwd+bwd, launches stubbed, next to the eager formula's.

    python -m posttrain_kernels.bench.host_overhead

What the Python layers (validation, autograd Function, plan lookup,
allocations) add per training step, measurable without a GPU: the launchers
run as on an H100 (sm_90 path, its plans and config lookups) but launch
nothing, on small CPU tensors. The eager PEFT formula
(PEFT's ``Linear.forward``: ``F.linear(x, W) + B(A(x))·s`` with x cast to
the fp32 adapters' dtype and the sum cast back; autograd backward) runs
on the same machine in the same process, at the same shapes (in fp32, see
``measure_eager``): its time is its host work plus the small CPU matmuls
themselves (kept tiny, so that the host work dominates). The last line, ``ratio ours/eager: X``, is the
comparison (the target: X ≤ 1.0). Run it alone: a busy CPU inflates
both sides.
"""
from __future__ import annotations

import dataclasses
import os
import time

import torch

# bf16, the dtype the sm_90 path runs on; few rows, so that the eager side's
# own arithmetic stays small next to its host work. Adapters in x's dtype,
# as in bench/lora.py's providers; with fp32 adapters (PEFT's default) the
# fused shrink adds one cast of A per forward (printed as a second line).
M, K, N, R, SCALE = 16, 64, 64, 16, 2.0


def _tensors(adapter_dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g).to(torch.bfloat16).requires_grad_()
    w = torch.randn(N, K, generator=g).to(torch.bfloat16)
    a = torch.randn(R, K, generator=g).to(adapter_dtype).requires_grad_()
    b = torch.randn(N, R, generator=g).to(adapter_dtype).requires_grad_()
    dy = torch.randn(M, N, generator=g).to(torch.bfloat16)
    return x, w, a, b, dy


def _best_us(step, reps: int, rounds: int) -> float:
    for _ in range(50):
        step()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            step()
        best = min(best, (time.perf_counter() - t0) / reps * 1e6)
    return best


def measure_eager(reps: int = 500, rounds: int = 5) -> float:
    """Best-of-rounds microseconds per fwd+bwd of the eager PEFT formula
    (``bench.lora.eager_lora``: the benchmark's ``eager`` provider).

    In fp32: on a CPU the bf16 matmuls are slow kernels whose arithmetic, not
    host work, would dominate and flatter our ratio."""
    from .lora import eager_lora
    x, w, a, b, dy = (v.detach().float().requires_grad_(v.requires_grad) for v in _tensors())

    def step():
        torch.autograd.grad(eager_lora(x, w, a, b, SCALE, None), (x, a, b), dy)

    return _best_us(step, reps, rounds)


def measure(reps: int = 500, rounds: int = 5, adapter_dtype=torch.bfloat16) -> float:
    """Best-of-rounds microseconds per fwd+bwd of ours, every launch stubbed."""
    from ..ops.backend import GEMM_VAR
    from ..ops.lora import function as Fn
    from ..ops.lora import launch as L
    from ..ops.lora import op as O

    class _NoLaunch:
        def __init__(self, jit):
            self.fn = jit.fn  # the Python function: the launchers read the kernel's argument list from it

        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    specs = ("LORA_SHRINK", "LORA_MATMUL", "LORA_MATMUL_TMA", "LORA_DY", "LORA_X")
    patched = ("device_info", "num_sms", "ensure_tma_allocator")
    saved = [(L, n, getattr(L, n)) for n in (*specs, *patched)] + [(O, "use_triton", O.use_triton)]
    saved_env = os.environ.get(GEMM_VAR)
    try:
        for n in specs:  # the same specs (config lookup and all), with a kernel that launches nothing
            setattr(L, n, dataclasses.replace(getattr(L, n), fn=_NoLaunch(getattr(L, n).fn)))
        O.use_triton = lambda device, backend=None: True
        L.device_info = lambda device: ("NVIDIA H100 80GB HBM3", 90)  # the cache lookup runs as on a GPU
        L.num_sms = lambda device: 132
        os.environ[GEMM_VAR] = "tma"  # the sm_90 path, as on an H100: TMA GEMM, fused shrink
        L.ensure_tma_allocator = lambda: None  # one context-variable read on a GPU; nothing to set here
        L.clear_plans()
        x, w, a, b, dy = _tensors(adapter_dtype)

        def step():
            y = Fn.lora_linear(x, w, a, b, SCALE)
            torch.autograd.grad(y, (x, a, b), dy)

        return _best_us(step, reps, rounds)
    finally:
        for module, n, v in saved:
            setattr(module, n, v)
        if saved_env is None:
            os.environ.pop(GEMM_VAR, None)
        else:
            os.environ[GEMM_VAR] = saved_env
        L.clear_plans()  # the plans built here hold the stubs


def measure_cuda(reps: int = 300, rounds: int = 5) -> tuple[float, float]:
    """(ours, eager): microseconds of host time per fwd+bwd on a CUDA device,
    every kernel really launched, at the same small shapes (bf16, adapters in
    bf16): the GPU work is a few microseconds, so the loop runs at the speed
    the host enqueues (Triton's launch path included)."""
    from ..ops.lora import function as Fn
    from .lora import eager_lora
    x, w, a, b, dy = (v.detach().cuda().requires_grad_(v.requires_grad) for v in _tensors())

    def ours():
        torch.autograd.grad(Fn.lora_linear(x, w, a, b, SCALE), (x, a, b), dy)

    def eager():
        torch.autograd.grad(eager_lora(x, w, a, b, SCALE, None), (x, a, b), dy)

    out = []
    for step in (ours, eager):
        torch.cuda.synchronize()
        out.append(_best_us(step, reps, rounds))
        torch.cuda.synchronize()
    return out[0], out[1]


def main(argv=None) -> None:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cuda", action="store_true",
                    help="also time the real launches on the CUDA device (host enqueue per fwd+bwd)")
    args = ap.parse_args(argv)
    if args.cuda:
        ours_gpu, eager_gpu = measure_cuda()
        print(f"CUDA, kernels launched (M={M}, K={K}, N={N}, r={R}, bf16): host time per fwd+bwd: ours "
              f"{ours_gpu:.0f} us, eager formula {eager_gpu:.0f} us, ratio {ours_gpu / eager_gpu:.2f}")
    ours = measure()
    ours_fp32 = measure(adapter_dtype=torch.float32)
    eager = measure_eager()
    print(f"host time per fused-LoRA fwd+bwd, launches stubbed, fp32 adapters: {ours_fp32:.0f} us")
    print(f"host time per fused-LoRA fwd+bwd, launches stubbed: {ours:.0f} us")
    print(f"eager PEFT formula fwd+bwd on the same machine (M={M}, K={K}, N={N}, r={R}, fp32 CPU): {eager:.0f} us")
    print(f"ratio ours/eager: {ours / eager:.2f}")


if __name__ == "__main__":
    main()
