"""Fused LoRA benchmark: ``linear`` (F.linear alone, the floor), ``eager``
(PEFT's formula in eager PyTorch), ``compile`` (it, torch.compile'd), ``peft``
(PEFT's own layer), ``peft+patch`` (the same PeftModel after ``patch_peft``),
``ours`` and ``ours-portable`` (ours with the portable GEMM kernel forced:
on sm_90 the TMA kernel against the plain ``tl.dot`` loop), forward,
backward and forward+backward.

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

from ..ops.common import dtype_name
from ..ops.lora import lora_linear
from ..ops.lora import reference as ref
from .common import Result, Timer, progress

PROVIDERS = ("linear", "eager", "compile", "peft", "peft+patch", "ours", "ours-portable")
MODES = ("fwd", "bwd", "fwd+bwd")


@dataclasses.dataclass(frozen=True)
class LoRAShape:
    M: int
    K: int
    N: int
    r: int
    dtype: torch.dtype = torch.bfloat16

    @property
    def label(self) -> str:
        return f"M={self.M} K={self.K} N={self.N} r={self.r} {dtype_name(self.dtype)}"


GPU_SHAPES = [LoRAShape(8192, 4096, 4096, 16), LoRAShape(8192, 4096, 14336, 16), LoRAShape(8192, 14336, 4096, 16)]
SMOKE_SHAPES = [LoRAShape(64, 96, 80, 8, torch.float32), LoRAShape(48, 64, 72, 4, torch.float16)]


def flops(s: LoRAShape, provider: str, mode: str) -> float:
    """Useful FLOPs of the provider's problem (the frozen linear's for ``linear``)."""
    base = 2.0 * s.M * s.K * s.N
    lora = 2.0 * s.M * s.r * (s.K + s.N)
    fwd = base if provider == "linear" else base + lora
    bwd = base if provider == "linear" else base + 3 * lora  # dx; + dt, dA, dB and dx's low-rank term
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def min_bytes(s: LoRAShape, mode: str) -> float:
    """Fewest bytes that must move: each input read once, each output written once."""
    e = torch.finfo(s.dtype).bits // 8
    adapters = s.r * (s.K + s.N)
    fwd = e * (s.M * s.K + s.N * s.K + s.M * s.N + adapters)  # read x, W, A, B; write y
    bwd = e * (s.M * s.N + s.N * s.K + s.M * s.K + 2 * adapters + s.M * s.K)  # read dy, W, A, B, x; write dx, dA, dB
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


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


class _OneLinear(torch.nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def _peft_layer(w, a, b, bias, scale):
    """PEFT's own LoRA layer (through ``get_peft_model``, stable across PEFT
    versions) around an nn.Linear holding the same weights."""
    import peft
    N, K = w.shape
    r = a.shape[0]
    base = torch.nn.Linear(K, N, bias=bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        base.weight.copy_(w)
        if bias is not None:
            base.bias.copy_(bias)
    config = peft.LoraConfig(r=r, lora_alpha=scale * r, lora_dropout=0.0, target_modules=["proj"])
    model = peft.get_peft_model(_OneLinear(base), config)
    layer = model.base_model.model.proj
    with torch.no_grad():  # the adapters in the benchmark's dtype, as for the other providers
        layer.lora_A["default"].weight.data = a.clone()
        layer.lora_B["default"].weight.data = b.clone()
    return model, (layer.lora_A["default"].weight, layer.lora_B["default"].weight)


_COMPILED = {}


def _compiled_eager():
    # One torch.compile'd function for every shape and mode: dynamo keeps one
    # graph per input signature, so each is compiled once per process.
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(eager_lora, dynamic=False)
    return _COMPILED["fn"]


def available_providers() -> tuple:
    try:
        import peft  # noqa: F401
        return PROVIDERS
    except ImportError:
        return tuple(p for p in PROVIDERS if not p.startswith("peft"))


def provider_fn(provider: str, mode: str, s: LoRAShape, inputs, scale: float = 2.0):
    """A zero-argument callable doing ``mode`` of ``provider`` once."""
    x, w, a, b, bias, dy = inputs
    xs = x.detach().requires_grad_(mode != "fwd")
    if provider in ("peft", "peft+patch"):
        layer, lora_params = _peft_layer(w, a, b, bias, scale)
        if provider == "peft+patch":  # PEFT's own model, its LoRA layers run by the fused kernels
            from ..ops.adapters.patch import patch_peft
            patch_peft(layer)
        for p in lora_params:
            p.requires_grad_(mode != "fwd")
        fwd = lambda: layer(xs)  # noqa: E731
        wrt = (xs, *lora_params)
    else:
        as_, bs = (v.detach().requires_grad_(mode != "fwd") for v in (a, b))
        eager = _compiled_eager() if provider == "compile" else eager_lora
        fn = {
            "linear": lambda: F.linear(xs, w, bias),
            "eager": lambda: eager(xs, w, as_, bs, scale, bias),
            "compile": lambda: eager(xs, w, as_, bs, scale, bias),
            "ours": lambda: lora_linear(xs, w, as_, bs, scale, bias),
        }[provider]
        fwd = fn
        wrt = (xs,) if provider == "linear" else (xs, as_, bs)
    if mode == "fwd":
        return fwd
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(fwd(), wrt, dy)
    y = fwd()  # bwd alone: one forward, then the backward repeated on its graph
    return lambda: torch.autograd.grad(y, wrt, dy, retain_graph=True)


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


def gemm_override(path: str):
    """``POSTTRAIN_KERNELS_GEMM=path`` for a block (the launchers' plans rebuilt around it)."""
    from ..autotune.cache import env_override
    from ..ops.backend import GEMM_VAR
    return env_override(GEMM_VAR, path)


def run(shapes, timer: Timer, providers=None, modes=MODES, peaks=None) -> list[Result]:
    """``peaks``: (TFLOP/s, GB/s) measured on this device, for the roofline
    column; None leaves it empty."""
    device = timer.device
    providers = providers or available_providers()
    out = []
    for i, s in enumerate(shapes):
        progress(f"lora {i + 1}/{len(shapes)}: {s.label}: check, then {len(providers)} providers x {len(modes)} modes")
        inputs = make_inputs(s, device)
        err = check(s, inputs)
        err_portable = None
        if "ours-portable" in providers:
            with gemm_override("portable"):
                err_portable = check(s, inputs)
        for mode in modes:
            times = {}
            for p in providers:
                if p == "ours-portable":
                    with gemm_override("portable"):
                        times[p] = timer.time(provider_fn("ours", mode, s, inputs))
                else:
                    times[p] = timer.time(provider_fn(p, mode, s, inputs))
            for p in providers:
                med, p20, p80 = times[p]
                floor = None
                if peaks is not None:
                    floor = max(flops(s, p, mode) / (peaks[0] * 1e9), min_bytes(s, mode) / (peaks[1] * 1e6))
                out.append(Result(
                    bench="lora", shape=s.label, dtype=dtype_name(s.dtype), mode=mode, provider=p, ms=med, p20_ms=p20,
                    p80_ms=p80, checks="forward and every gradient" if p.startswith("ours") else None,
                    tflops=flops(s, p, mode) / med / 1e9, gbps=min_bytes(s, mode) / med / 1e6,
                    vs={q: med / times[q][0] for q in providers if q != p},
                    rel_err=err if p == "ours" else err_portable if p == "ours-portable" else None,
                    roofline_pct=None if floor is None else 100.0 * floor / med))
        del inputs
    return out
