"""Fused LoRA benchmark: ``linear`` (F.linear alone, the floor), ``eager``
(PEFT's formula in eager PyTorch) and ``ours``, forward and forward+backward.

fwd+bwd differentiates what training differentiates: x and the adapters for
the LoRA providers, x alone for the frozen ``linear`` (its weight is frozen
too). Gradients come from ``torch.autograd.grad`` so no provider pays for
accumulating into ``.grad``.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from ..ops import reference as ref
from ..ops.lora import lora_linear
from .common import Result, Timer

PROVIDERS = ("linear", "eager", "ours")
MODES = ("fwd", "fwd+bwd")


@dataclasses.dataclass(frozen=True)
class LoRAShape:
    M: int
    K: int
    N: int
    r: int
    dtype: torch.dtype = torch.bfloat16

    @property
    def label(self) -> str:
        return f"M={self.M} K={self.K} N={self.N} r={self.r} {str(self.dtype).removeprefix('torch.')}"


GPU_SHAPES = [LoRAShape(8192, 4096, 4096, 16), LoRAShape(8192, 4096, 14336, 16), LoRAShape(8192, 14336, 4096, 16)]
SMOKE_SHAPES = [LoRAShape(64, 96, 80, 8, torch.float32), LoRAShape(48, 64, 72, 4, torch.float16)]


def flops(s: LoRAShape, provider: str, mode: str) -> float:
    base = 2.0 * s.M * s.K * s.N
    lora = 2.0 * s.M * s.r * (s.K + s.N)
    if provider == "linear":
        return base if mode == "fwd" else 2 * base  # fwd + dx
    return base + lora if mode == "fwd" else 2 * base + 3 * lora  # + dt, dA, dB, dx's low-rank term


def min_bytes(s: LoRAShape, mode: str) -> float:
    """Fewest bytes that must move: each input read once, each output written once."""
    e = torch.finfo(s.dtype).bits // 8
    fwd = e * (s.M * s.K + s.N * s.K + s.M * s.N + s.r * (s.K + s.N))
    if mode == "fwd":
        return fwd
    return fwd + e * (s.M * s.N + s.M * s.K + s.r * (s.K + s.N))  # read dy, write dx, dA, dB


def make_inputs(s: LoRAShape, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(s.M, s.K, generator=g).to(device, s.dtype)
    w = (torch.randn(s.N, s.K, generator=g) / math.sqrt(s.K)).to(device, s.dtype)
    a = (torch.randn(s.r, s.K, generator=g) / math.sqrt(s.K)).to(device, s.dtype)
    b = (torch.randn(s.N, s.r, generator=g) / math.sqrt(s.r)).to(device, s.dtype)
    bias = torch.randn(s.N, generator=g).to(device, s.dtype)
    dy = torch.randn(s.M, s.N, generator=g).to(device, s.dtype)
    return x, w, a, b, bias, dy


def eager_lora(x, w, a, b, scale, bias):
    """PEFT's LoRA Linear forward in eager PyTorch (dropout off)."""
    return F.linear(x, w, bias) + F.linear(F.linear(x, a), b) * scale


def provider_fn(provider: str, mode: str, s: LoRAShape, inputs, scale: float = 2.0):
    x, w, a, b, bias, dy = inputs
    fwd = {
        "linear": lambda x_, a_, b_: F.linear(x_, w, bias),
        "eager": lambda x_, a_, b_: eager_lora(x_, w, a_, b_, scale, bias),
        "ours": lambda x_, a_, b_: lora_linear(x_, w, a_, b_, scale, bias),
    }[provider]
    if mode == "fwd":
        return lambda: fwd(x, a, b)
    xs, as_, bs = (v.detach().requires_grad_(True) for v in (x, a, b))
    wrt = (xs,) if provider == "linear" else (xs, as_, bs)
    return lambda: torch.autograd.grad(fwd(xs, as_, bs), wrt, dy)


def check(s: LoRAShape, inputs, scale: float = 2.0) -> float:
    """Relative error of ours (fwd and every gradient) against fp32/fp64 math."""
    x, w, a, b, bias, dy = inputs
    hi_dtype = torch.float64 if x.device.type == "cpu" else torch.float32
    leaves = [v.detach().requires_grad_(True) for v in (x, a, b)]
    y = lora_linear(leaves[0], w, leaves[1], leaves[2], scale, bias)
    got = [y, *torch.autograd.grad(y, leaves, dy)]
    hl = [v.detach().to(hi_dtype).requires_grad_(True) for v in (x, a, b)]
    yr = ref.lora_linear_ref(hl[0], w.to(hi_dtype), hl[1], hl[2], scale, bias.to(hi_dtype))
    want = [yr, *torch.autograd.grad(yr, hl, dy.to(hi_dtype))]
    return max(((g.to(hi_dtype) - r).norm() / r.norm()).item() for g, r in zip(got, want))


def run(shapes, timer: Timer, providers=PROVIDERS, modes=MODES) -> list[Result]:
    device = timer.device
    out = []
    for s in shapes:
        inputs = make_inputs(s, device)
        err = check(s, inputs)
        for mode in modes:
            times = {}
            for p in providers:
                times[p] = timer.time(provider_fn(p, mode, s, inputs))
            for p in providers:
                med, p20, p80 = times[p]
                out.append(Result(
                    bench="lora", shape=s.label, mode=mode, provider=p, ms=med, p20_ms=p20, p80_ms=p80,
                    tflops=flops(s, p, mode) / med / 1e9, gbps=min_bytes(s, mode) / med / 1e6,
                    vs={q: med / times[q][0] for q in providers if q != p},
                    rel_err=err if p == "ours" else None))
        del inputs
    return out
