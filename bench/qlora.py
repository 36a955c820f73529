"""LoRA over a 4-bit base (QLoRA): bitsandbytes' NF4 storage (double-quantised scales, blocksize
64), LoRA r, the base frozen.

Providers:

* ``bf16``: the frozen layer in the compute dtype, ``F.linear`` on the dense weight (forward; dX
  for fwd+bwd): the floor a 4-bit base is measured against.
* ``bnb+eager``: bitsandbytes' ``Linear4bit`` forward (its dequantise-to-buffer + cuBLAS, or its
  4-bit GEMV at one token) and the adapter in eager PyTorch: PEFT's QLoRA layer. Where
  bitsandbytes is installed.
* ``dequant+eager``: our decode kernel into a buffer, ``F.linear``, the adapter in eager PyTorch:
  the same recipe without bitsandbytes.
* ``ours``: ``lora_linear`` over the ``NF4Weight`` (where the GEMM decodes: by the token count);
  ``ours-inloop`` / ``ours-buffer`` force the decode in the main loop or into a buffer.

Shapes: training (M=8192, K=N=4096, r=16; fwd and fwd+bwd: dX and the adapters' gradients),
decode (M=16), and serving (M=64 tokens over 64 adapters, ``multi_lora_linear``; providers
``bf16``, ``ours``). The check: ours' output (and gradients) against the formula in fp32 over
the decoded weight.
"""
from __future__ import annotations

import dataclasses
import math
import os

import torch
import torch.nn.functional as F

from ..ops.common import dtype_name
from ..ops.lora import lora_linear
from ..ops.multi_lora import multi_lora_linear
from ..ops.quant import dequantize_nf4, dequantize_weight, quantize_nf4
from ..ops.quant.launch import QUANT_GEMM_VAR
from .common import Result, Timer, progress


@dataclasses.dataclass(frozen=True)
class Shape:
    M: int
    K: int
    N: int
    r: int = 16
    adapters: int = 0  # > 0: a serving batch over this many adapters (multi-LoRA)
    modes: tuple = ("fwd",)
    dtype: torch.dtype = torch.bfloat16

    @property
    def label(self) -> str:
        pool = f" {self.adapters} adapters" if self.adapters else ""
        return f"M={self.M} K={self.K} N={self.N} r={self.r}{pool} nf4 {dtype_name(self.dtype)}"


GPU_SHAPES = [Shape(8192, 4096, 4096, modes=("fwd", "fwd+bwd")), Shape(16, 4096, 4096),
              Shape(64, 4096, 4096, adapters=64)]
SMOKE_SHAPES = [Shape(24, 128, 48, 8, modes=("fwd", "fwd+bwd"), dtype=torch.float32),
                Shape(8, 128, 40, 4, adapters=3, dtype=torch.float16)]


def _bnb_layer(w_dense: torch.Tensor, dtype: torch.dtype):
    """bitsandbytes' Linear4bit (nf4, double-quantised, compute dtype ``dtype``) over the same weight."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    N, K = w_dense.shape
    layer = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(w_dense.detach().cpu(), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4")
    return layer.to(w_dense.device)


def _weights(s: Shape, device, g):
    """(4-bit weight, its dense decode in the compute dtype): from bitsandbytes' quantiser when it is
    installed (its double-quantised scales), else ours (plain scales)."""
    dense = (torch.randn(s.N, s.K, generator=g) / math.sqrt(s.K)).to(device, s.dtype)
    layer = _bnb_layer(dense, s.dtype) if device.type == "cuda" else None
    if layer is not None:
        from ..ops.quant import from_bnb
        w = from_bnb(layer)
    else:
        w = quantize_nf4(dense, 64)
    return w, dequantize_nf4(w).to(s.dtype), layer


def _check(fwd_ours, fwd_ref, leaves, dy, modes) -> float:
    got = fwd_ours()
    want = fwd_ref()
    outs = [(got, want)]
    if "fwd+bwd" in modes:
        outs += list(zip(torch.autograd.grad(got, leaves, dy), torch.autograd.grad(want, leaves, dy)))
    return max(((u.double() - v.double()).norm() / v.double().norm().clamp_min(1e-30)).item() for u, v in outs)


def run(shapes, timer: Timer, peaks=None) -> list[Result]:
    out = []
    dev = timer.device
    for i, s in enumerate(shapes):
        progress(f"qlora {i + 1}/{len(shapes)}: {s.label}")
        g = torch.Generator().manual_seed(0)
        w, dense, bnb_layer = _weights(s, dev, g)
        x = torch.randn(s.M, s.K, generator=g).to(dev, s.dtype).requires_grad_()
        dy = torch.randn(s.M, s.N, generator=g).to(dev, s.dtype)
        scale = 2.0
        if s.adapters:
            S = s.adapters
            A = (torch.randn(S, s.r, s.K, generator=g) / math.sqrt(s.K)).to(dev, s.dtype)
            B = (torch.randn(S, s.N, s.r, generator=g) / math.sqrt(s.r)).to(dev, s.dtype)
            ranks = torch.full((S,), s.r, dtype=torch.int32, device=dev)
            scales = torch.full((S,), scale, device=dev)
            ids = torch.arange(s.M, device=dev) % S
            fns = {"bf16": lambda: F.linear(x, dense),
                   "ours": lambda: multi_lora_linear(x, w, A, B, ranks, scales, ids),
                   "ours(dense base)": lambda: multi_lora_linear(x, dense, A, B, ranks, scales, ids)}
            ref = lambda: multi_lora_linear(x.float(), dense.float(), A.float(), B.float(), ranks, scales,  # noqa: E731
                                            ids, backend="reference")
            leaves = [x]
        else:
            a = (torch.randn(s.r, s.K, generator=g) / math.sqrt(s.K)).to(dev, torch.float32).requires_grad_()
            b = (torch.randn(s.N, s.r, generator=g) / math.sqrt(s.r)).to(dev, torch.float32).requires_grad_()
            leaves = [x, a, b]

            def eager_lora(base):
                return base + (x.to(a.dtype) @ a.t() @ b.t() * scale).to(s.dtype)

            fns = {"bf16": lambda: F.linear(x, dense),
                   "dequant+eager": lambda: eager_lora(F.linear(x, dequantize_weight(w, s.dtype))),
                   "ours": lambda: lora_linear(x, w, a, b, scale)}
            if bnb_layer is not None:
                fns["bnb+eager"] = lambda: eager_lora(bnb_layer(x))
            for path in ("inloop", "buffer"):
                def forced(path=path):
                    # the decode choice is read per call (no plan to rebuild, unlike env_override's reset)
                    saved = os.environ.get(QUANT_GEMM_VAR)
                    os.environ[QUANT_GEMM_VAR] = path
                    try:
                        return lora_linear(x, w, a, b, scale)
                    finally:
                        os.environ.pop(QUANT_GEMM_VAR) if saved is None else os.environ.update({QUANT_GEMM_VAR: saved})
                fns[f"ours-{path}"] = forced
            ref = lambda: eager_lora(F.linear(x.float(), dense.float()).to(s.dtype))  # noqa: E731
        err = _check(fns["ours"], ref, leaves, dy, s.modes)
        for mode in s.modes:
            def timed(fn, mode=mode, provider=None):
                if mode == "fwd":
                    return fn
                wrt = [x] if provider == "bf16" else leaves
                return lambda: torch.autograd.grad(fn(), wrt, dy)
            times = {p: timer.time(timed(fn, provider=p)) for p, fn in fns.items()}
            base = 2.0 * s.M * s.K * s.N * (1 if mode == "fwd" else 2)
            weight_bytes = s.N * s.K * (0.5 + 1 / 64 + 4 / (64 * 256))  # codes, 8-bit scales, their fp32 scales
            for p, (med, p20, p80) in times.items():
                roof = None
                if peaks is not None:
                    moved = (s.M * (s.K + s.N) * 2 + (2 * s.N * s.K if p == "bf16" else weight_bytes))
                    roof = 100.0 * max(base / (peaks[0] * 1e9), moved / (peaks[1] * 1e6)) / med
                out.append(Result(bench="qlora", shape=s.label, dtype=dtype_name(s.dtype), mode=mode, provider=p,
                                  ms=med, p20_ms=p20, p80_ms=p80, tflops=base / med / 1e9, gbps=0.0,
                                  vs={q: med / times[q][0] for q in times if q != p}, roofline_pct=roof,
                                  rel_err=err if p == "ours" else None,
                                  checks=("forward and every gradient" if "fwd+bwd" in s.modes else "forward")
                                  if p == "ours" else None))
    return out
