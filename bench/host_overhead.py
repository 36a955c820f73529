"""Host (CPU) time of one fused-LoRA fwd+bwd with every Triton launch stubbed out.

    python -m posttrain_kernels.bench.host_overhead

What the Python layers (validation, autograd Function, config lookup,
launcher arithmetic) add per training step, measurable without a GPU: the
launchers run as on a CUDA device (config lookup included) but launch
nothing, on tiny CPU tensors. When this approaches the GPU time of a layer,
the step becomes launch-bound (docs/benchmarks.md). Run it alone: a busy CPU
inflates it.
"""
from __future__ import annotations

import time

import torch


def measure(reps: int = 500, rounds: int = 5) -> float:
    """Best-of-rounds microseconds per fwd+bwd."""
    from ..ops import lora as L

    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    saved = {n: getattr(L, n) for n in ("_lora_shrink_kernel", "_lora_matmul_kernel", "_lora_grad_kernel",
                                        "use_triton", "device_info", "compute_capability", "num_sms")}
    try:
        for n in ("_lora_shrink_kernel", "_lora_matmul_kernel", "_lora_grad_kernel"):
            setattr(L, n, _NoLaunch())
        L.use_triton = lambda device, backend=None: True
        L.device_info = lambda device: ("NVIDIA H100 80GB HBM3", 90)  # the cache lookup runs as on a GPU
        L.compute_capability = lambda device: 90
        L.num_sms = lambda device: 132
        x = torch.randn(64, 64, requires_grad=True)
        w = torch.randn(64, 64)
        a = torch.randn(16, 64, requires_grad=True)
        b = torch.randn(64, 16, requires_grad=True)
        dy = torch.randn(64, 64)

        def step():
            y = L.lora_linear(x, w, a, b, 2.0)
            torch.autograd.grad(y, (x, a, b), dy)

        for _ in range(50):
            step()
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(reps):
                step()
            best = min(best, (time.perf_counter() - t0) / reps * 1e6)
        return best
    finally:
        for n, v in saved.items():
            setattr(L, n, v)


if __name__ == "__main__":
    print(f"host time per fused-LoRA fwd+bwd, launches stubbed: {measure():.0f} us")
