"""LoRA over a quantized frozen base: bitsandbytes' NF4 storage (double-quantised scales, blocksize
64) and fp8 e4m3 (per-row or 128×128 tile scales, HF FP8 checkpoints'), LoRA r, the base frozen.

Providers:

* ``bf16``: the frozen layer in the compute dtype, ``F.linear`` on the dense weight (forward; dX
  for fwd+bwd): the floor a quantized base is measured against.
* ``bnb+eager`` (NF4): bitsandbytes' ``Linear4bit`` forward (its dequantise-to-buffer + cuBLAS, or
  its 4-bit GEMV at one token) and the adapter in eager PyTorch: PEFT's QLoRA layer. Where
  bitsandbytes is installed.
* ``scaled_mm`` (fp8 per row): ``torch._scaled_mm`` on pre-quantised e4m3 activations with per-row
  scales (forward; dX on a transposed copy of the weight made outside the timing): the fp8 floor,
  GEMMs only (no activation quantisation, no adapter). Where it runs (sm_89+).
* ``dequant+eager``: our decode kernel into a buffer, ``F.linear``, the adapter in eager PyTorch:
  PEFT's recipe without bitsandbytes (and what transformers' FP8 layer does in its backward).
* ``ours``: ``lora_linear`` over the quantized weight (how the GEMM runs: by the token count and the
  format, ``ops/quant/launch.py: gemm_mode``); ``ours-inloop`` / ``ours-buffer`` / ``ours-mma`` force
  the decode in the main loop, into a buffer, or (fp8) the fp8 tensor-core GEMM.

Shapes: training (M=8192, K=N=4096, r=16; fwd and fwd+bwd: dX and the adapters' gradients),
decode (M=16), and serving (M=64 tokens over 64 adapters, ``multi_lora_linear``; providers
``bf16``, ``ours``, ``ours(dense base)``). The check: ours' output (and gradients) against the
formula in fp32 over the decoded weight; where ours runs the fp8 tensor-core GEMM, over the
activations as it quantises them (x_q·sx), the values it multiplies.
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
from ..ops.quant.fp8 import dequantize_fp8, quantize_fp8
from ..ops.quant.launch import QUANT_GEMM_VAR, fp8_quantize_act, gemm_mode
from .common import Result, Timer, progress

FORMATS = ("nf4", "fp8-row", "fp8-block")


@dataclasses.dataclass(frozen=True)
class Shape:
    M: int
    K: int
    N: int
    r: int = 16
    adapters: int = 0  # > 0: a serving batch over this many adapters (multi-LoRA)
    modes: tuple = ("fwd",)
    fmt: str = "nf4"
    dtype: torch.dtype = torch.bfloat16

    @property
    def label(self) -> str:
        pool = f" {self.adapters} adapters" if self.adapters else ""
        return f"M={self.M} K={self.K} N={self.N} r={self.r}{pool} {self.fmt} {dtype_name(self.dtype)}"


_TRAIN = ("fwd", "fwd+bwd")
GPU_SHAPES = [Shape(8192, 4096, 4096, modes=_TRAIN), Shape(8192, 4096, 4096, modes=_TRAIN, fmt="fp8-row"),
              Shape(8192, 4096, 4096, modes=_TRAIN, fmt="fp8-block"), Shape(16, 4096, 4096),
              Shape(16, 4096, 4096, fmt="fp8-block"), Shape(64, 4096, 4096, adapters=64),
              Shape(64, 4096, 4096, adapters=64, fmt="fp8-block")]
HEADLINE = 3  # --quick: the training shape of each format (NF4, fp8 rows, fp8 tiles)
SMOKE_SHAPES = [Shape(24, 128, 48, 8, modes=_TRAIN, dtype=torch.float32),
                Shape(20, 256, 40, 4, modes=_TRAIN, fmt="fp8-block", dtype=torch.float16),
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
    """(quantized weight, its dense decode in the compute dtype, bitsandbytes' layer or None). NF4
    from bitsandbytes' quantiser when it is installed (its double-quantised scales), else ours."""
    dense = (torch.randn(s.N, s.K, generator=g) / math.sqrt(s.K)).to(device, s.dtype)
    if s.fmt != "nf4":
        w = quantize_fp8(dense, s.fmt.split("-")[1])
        return w, dequantize_fp8(w, s.dtype), None
    layer = _bnb_layer(dense, s.dtype) if device.type == "cuda" else None
    if layer is not None:
        from ..ops.quant import from_bnb
        w = from_bnb(layer)
    else:
        w = quantize_nf4(dense, 64)
    return w, dequantize_nf4(w).to(s.dtype), layer


def _forced(path: str, fn):
    """``fn`` with the GEMM's mode forced: the choice is read per call (no plan to rebuild)."""
    def run():
        saved = os.environ.get(QUANT_GEMM_VAR)
        os.environ[QUANT_GEMM_VAR] = path
        try:
            return fn()
        finally:
            os.environ.pop(QUANT_GEMM_VAR) if saved is None else os.environ.update({QUANT_GEMM_VAR: saved})
    return run


def _x_hat(x):
    """x as the fp8 tensor-core GEMM multiplies it (x_q·sx), in x's dtype, detached."""
    xq, sx, _ = fp8_quantize_act(x.detach())
    return (xq.float() * sx.repeat_interleave(128, 1)[:, :x.shape[1]]).to(x.dtype)


def _scaled_mm(x, w, dy, mode):
    """The fp8 floor: ``torch._scaled_mm`` rowwise on pre-quantised operands, or None where it does not run."""
    if not hasattr(torch, "_scaled_mm") or x.device.type != "cuda" or w.block is not None:
        return None
    xq, sx = _rowwise(x)
    wq, sw = w.data, w.scale[None, :]
    try:
        torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw, out_dtype=x.dtype)
    except (RuntimeError, TypeError, ValueError):
        return None
    fwd = lambda: torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw, out_dtype=x.dtype)  # noqa: E731
    if mode == "fwd":
        return fwd
    dyq, sdy = _rowwise(dy * w.scale[None, :].to(dy.dtype))  # dX = dY·W: W's row scales along the reduction
    wt = wq.t().contiguous().t()  # column-major [N, K] for mat2, made once here
    ones = torch.ones(1, wq.shape[1], device=x.device)
    return lambda: (fwd(), torch._scaled_mm(dyq, wt, scale_a=sdy, scale_b=ones, out_dtype=x.dtype))


def _rowwise(x):
    amax = x.float().abs().amax(1, keepdim=True).clamp(min=1e-12)
    s = amax / 448.0
    return (x.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn), s


def _check(fwd_ours, fwd_ref, leaves, dy, modes) -> float:
    got = fwd_ours()
    want = fwd_ref()
    outs = [(got, want)]
    if "fwd+bwd" in modes:
        outs += list(zip(torch.autograd.grad(got, leaves, dy), torch.autograd.grad(want, leaves, dy)))
    return max(((u.double() - v.double()).norm() / v.double().norm().clamp_min(1e-30)).item() for u, v in outs)


def _checks(s: Shape, mma: bool) -> str:
    if "fwd+bwd" not in s.modes:
        return "forward"
    # the fp8 GEMM's dX multiplies dY as it quantises it: the reference's exact dY would differ by that
    return "forward and the adapters' gradients" if mma else "forward and every gradient"


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
            leaves, mma = [x], False
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
            for path in ("inloop", "buffer") + (("mma",) if s.fmt != "nf4" else ()):
                fns[f"ours-{path}"] = _forced(path, lambda: lora_linear(x, w, a, b, scale))
            mma = gemm_mode(w, x, s.M) == "mma"

            def ref():  # the formula in fp32 over the decoded weight; for the fp8 GEMM over x as it quantises x
                return eager_lora(F.linear((_x_hat(x) if mma else x).float(), dense.float()).to(s.dtype))
        mma = not s.adapters and mma
        err = _check(fns["ours"], ref, leaves[1:] if mma else leaves, dy, s.modes)  # x's gradient: not with mma
        for mode in s.modes:
            def timed(fn, mode=mode, provider=None):
                if mode == "fwd":
                    return fn
                wrt = [x] if provider == "bf16" else leaves
                return lambda: torch.autograd.grad(fn(), wrt, dy)
            times = {p: timer.time(timed(fn, provider=p)) for p, fn in fns.items()}
            floor = _scaled_mm(x.detach(), w, dy, mode) if s.fmt == "fp8-row" and not s.adapters else None
            if floor is not None:
                times["scaled_mm"] = timer.time(floor)
            base = 2.0 * s.M * s.K * s.N * (1 if mode == "fwd" else 2)
            per_element = {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "fp8-row": 1.0, "fp8-block": 1.0}[s.fmt]
            weight_bytes = s.N * s.K * per_element  # the codes and their scales
            for p, (med, p20, p80) in times.items():
                roof = None
                if peaks is not None:
                    moved = s.M * (s.K + s.N) * 2 + (2 * s.N * s.K if p == "bf16" else weight_bytes)
                    roof = 100.0 * max(base / (peaks[0] * 1e9), moved / (peaks[1] * 1e6)) / med
                out.append(Result(bench="qlora", shape=s.label, dtype=dtype_name(s.dtype), mode=mode, provider=p,
                                  ms=med, p20_ms=p20, p80_ms=p80, tflops=base / med / 1e9, gbps=0.0,
                                  vs={q: med / times[q][0] for q in times if q != p}, roofline_pct=roof,
                                  rel_err=err if p == "ours" else None,
                                  checks=_checks(s, mma) if p == "ours" else None))
    return out
