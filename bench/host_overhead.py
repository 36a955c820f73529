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
    import dataclasses

    from ..ops.lora import function as F
    from ..ops.lora import launch as L
    from ..ops.lora import op as O

    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    specs = ("LORA_SHRINK", "LORA_MATMUL", "LORA_GRAD")
    saved = [(L, n, getattr(L, n)) for n in (*specs, "device_info", "num_sms")] + [(O, "use_triton", O.use_triton)]
    try:
        for n in specs:  # the same specs (config lookup and all), with a kernel that launches nothing
            setattr(L, n, dataclasses.replace(getattr(L, n), fn=_NoLaunch()))
        O.use_triton = lambda device, backend=None: True
        L.device_info = lambda device: ("NVIDIA H100 80GB HBM3", 90)  # the cache lookup runs as on a GPU
        L.num_sms = lambda device: 132
        x = torch.randn(64, 64, requires_grad=True)
        w = torch.randn(64, 64)
        a = torch.randn(16, 64, requires_grad=True)
        b = torch.randn(64, 16, requires_grad=True)
        dy = torch.randn(64, 64)

        def step():
            y = F.lora_linear(x, w, a, b, 2.0)
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
        for module, n, v in saved:
            setattr(module, n, v)


if __name__ == "__main__":
    print(f"host time per fused-LoRA fwd+bwd, launches stubbed: {measure():.0f} us")
