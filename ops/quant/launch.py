"""Launchers of the quantized-base kernels that stand alone (the decode into a buffer, the
multi-adapter forward over a quantized weight, the fp8 activation quantisation), what every
quantized launch passes for its weight, and the rule that picks how a GEMM over a quantized
weight runs.

The fused-LoRA GEMMs over a quantized weight are launches of ``ops/lora/launch.py``'s plans (they
share its shrink and backward passes); the multi-adapter one is called from
``ops/multi_lora/launch.py``'s ``matmul``.

How a GEMM over M tokens runs (``gemm_mode``; ``POSTTRAIN_KERNELS_QUANT_GEMM`` forces one):

* ``inloop``: the weight decoded in the GEMM's main loop, tile by tile (the default up to
  ``INLOOP_MAX_M`` tokens, ``POSTTRAIN_KERNELS_QUANT_INLOOP_MAX_M`` moves the crossover). Only a
  weight whose rows split into whole blocks of the tiles can (``aligned``); others take ``buffer``.
* ``mma`` (fp8 weights, 16-bit activations, on sm_89 and up): the activations quantised to fp8 per
  1×128 block by a pre-pass (which also computes the LoRA shrink), then the fp8 tensor-core GEMM:
  the default above the crossover. The weight's scales must be per row or per 128×128 tile.
* ``buffer``: the weight decoded once into a dense buffer the dense kernels read: the default
  above the crossover for 4-bit weights, and for what ``mma`` cannot take.

Read per call: the choice depends on the token count, which plans do not key on exactly.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from ...autotune.cache import select_config
from ...autotune.quant import (FP8_ACT_QUANT, FP8_BLOCK, INLOOP_MAX_M, QUANT_DEQUANT, QUANT_MULTI_LORA_MATMUL)
from ..backend import compute_capability, device_info, interpreter_enabled
from ..common import cdiv, dtype_name
from .fp8 import FP8Weight
from .nf4 import NF4Weight

QUANT_GEMM_VAR, INLOOP_VAR = "POSTTRAIN_KERNELS_QUANT_GEMM", "POSTTRAIN_KERNELS_QUANT_INLOOP_MAX_M"
MODES = ("auto", "inloop", "buffer", "mma")
_ROUND = {torch.float16: 1, torch.bfloat16: 2}


# ---------------------------------------------------------------- which GEMM
def gemm_mode(w, x: Tensor, M: int) -> str:
    """``inloop``, ``mma`` or ``buffer`` (module doc) for a GEMM over M tokens of x with weight w."""
    choice = (os.environ.get(QUANT_GEMM_VAR) or "auto").lower()
    if choice not in MODES:
        raise ValueError(f"{QUANT_GEMM_VAR} must be one of {MODES}, got {choice!r}")
    if choice == "buffer":
        return "buffer"
    can_mma = mma_supported(w, x)
    if choice == "mma":
        return "mma" if can_mma else "buffer"
    can_loop = aligned(w, 64)
    if choice == "inloop":
        return "inloop" if can_loop else "buffer"
    if can_loop and M <= int(os.environ.get(INLOOP_VAR) or INLOOP_MAX_M):
        return "inloop"
    cc = compute_capability(x.device)
    return "mma" if can_mma and cc is not None and cc >= 89 else "buffer"


def mma_supported(w, x: Tensor) -> bool:
    """An fp8 weight whose scales the fp8 GEMM takes (per row, or per 128×128 tile), 16-bit x."""
    return (isinstance(w, FP8Weight) and x.dtype in _ROUND and w.data.is_contiguous()
            and w.block in (None, (FP8_BLOCK, FP8_BLOCK)))


def aligned(w, cols: int) -> bool:
    """Whether tiles ``cols`` wide (at multiples of ``cols``) of each row of ``w`` lie inside one
    block: what the GEMMs' decode needs (``weight_tile``'s ALIGNED)."""
    if isinstance(w, FP8Weight):
        return w.block is None or w.block[1] % cols == 0
    return w.shape[1] % w.blocksize == 0 and w.blocksize % cols == 0


def check_tile(w, cols: int, kernel: str) -> None:
    """A GEMM's config must cut the weight's rows into whole blocks (a pinned config may not)."""
    if not aligned(w, cols):
        raise ValueError(f"{kernel}: a {cols}-wide weight tile does not divide the blocks of a "
                         f"[{w.shape[0]}, {w.shape[1]}] {type(w).__name__}: pin a config whose tiles do")


# ---------------------------------------------------------------- what a launch passes for the weight
def quant_code(w) -> int:
    """The kernels' QUANT: 0 4-bit, 1 4-bit double-quantised, 2 fp8 per row, 3 fp8 per tile."""
    if isinstance(w, FP8Weight):
        return 2 if w.block is None else 3
    return 0 if w.nested is None else 1


def weight_pointers(w) -> tuple:
    """The five weight pointers every quantized kernel takes (``kernels/quant.py``), contiguous; a
    format's unused ones are stood in for by one of its own tensors (never read)."""
    if isinstance(w, FP8Weight):
        data, scale = w.data.contiguous(), w.scale.contiguous()
        return data, scale, scale, scale, scale
    s = w.nested
    flat = (w.packed, w.absmax, w.code) + ((w.absmax, w.code) if s is None else (s.absmax2, s.code2))
    return tuple(t.contiguous() for t in flat)  # the kernels index them flat (views of strided storage: copies)


def weight_scalars(w) -> dict:
    """The integer and flag arguments every quantized kernel takes: QUANT and the block sizes."""
    if isinstance(w, FP8Weight):
        bn, bk = w.block or (1, 1)
        return dict(blocksize=bk, blocksize2=bn, QUANT=quant_code(w))
    s = w.nested
    return dict(blocksize=w.blocksize, blocksize2=1 if s is None else s.blocksize2, QUANT=quant_code(w))


def weight_offset(w) -> float:
    return float(w.nested.offset) if isinstance(w, NF4Weight) and w.nested is not None else 0.0


def w_round(w, dtype: torch.dtype) -> int:
    """The kernels' W_ROUND: the weight's own 16-bit dtype when it differs from the GEMM's (the
    decoded value is rounded to it first), else 0."""
    return _ROUND.get(w.dtype, 0) if w.dtype != dtype else 0


# ---------------------------------------------------------------- launchers
def dequantize_triton(w, dtype: torch.dtype) -> Tensor:
    """The dense ``[out, in]`` weight in ``dtype``, decoded by ``_quant_dequant_kernel``: equal to
    ``ops.quant.weight.dequantize(w, dtype)`` element for element."""
    WN, WK = w.shape
    ptrs = weight_pointers(w)
    out = torch.empty((WN, WK), device=ptrs[0].device, dtype=dtype)
    cfg = select_config(QUANT_DEQUANT, dtype_name(dtype), device_info(out.device), N=WN, K=WK)
    QUANT_DEQUANT.fn[(cdiv(WN, cfg["BLOCK_N"]), cdiv(WK, cfg["BLOCK_K"]))](
        *ptrs, out, weight_offset(w), N=WN, K=WK, stride_on=out.stride(0),
        ALIGNED=aligned(w, cfg["BLOCK_K"]), W_ROUND=w_round(w, dtype), **weight_scalars(w),
        **QUANT_DEQUANT.launch_kwargs(cfg))
    return out


def quant_multi_lora_matmul(x: Tensor, w, bias, rows, t: Tensor, b, stack, y: Tensor) -> None:
    """``ops/multi_lora/launch.py: matmul``'s forward over a quantized weight [N, K], decoded in the
    main loop: y[perm] = x[perm]·Wᵀ + Σ_runs Σ_slices s·t·b_a,iᵀ (+ bias), ``b`` read as [N, R]."""
    M, K = x.shape
    N = w.shape[0]
    cfg = select_config(QUANT_MULTI_LORA_MATMUL, dtype_name(x.dtype), device_info(x.device), N=N, K=K, M=M)
    check_tile(w, cfg["BLOCK_K"], QUANT_MULTI_LORA_MATMUL.name)
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
    QUANT_MULTI_LORA_MATMUL.fn[grid](
        x, *weight_pointers(w), bias.contiguous() if bias is not None else y, rows.perm, rows.sid, t, b.data,
        stack.ranks, stack.scales, stack.bounds, y, weight_offset(w),
        M=M, N=N, K=K, R_MAX=stack.max_rank, SLOTS=stack.slots,
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_tm=t.stride(0), stride_tr=t.stride(1),
        stride_bs=b.stride_s, stride_bn=b.stride_r, stride_br=b.stride_c, stride_ym=y.stride(0),
        stride_yn=y.stride(1), W_ROUND=w_round(w, x.dtype),
        HAS_BIAS=bias is not None, SLICED_OUTPUT=stack.num_slices > 1, NUM_SLICES=stack.num_slices,
        EVEN_K=K % cfg["BLOCK_K"] == 0, **weight_scalars(w), **QUANT_MULTI_LORA_MATMUL.launch_kwargs(cfg))


def fp8_quantize_act(x: Tensor, col_scale=None, lora_a=None, scale: float = 1.0):
    """(x_q [M, K] e4m3, sx [M, cdiv(K, 128)] fp32, t [M, R] fp32 or None): x quantised per row and
    128-column block (x·col, when ``col_scale`` [K] is given, before the quantisation), and with
    ``lora_a`` [R, K] the shrink t = scale·x·Aᵀ of the unquantised x, in one pass over x."""
    M, K = x.shape
    KB = cdiv(K, FP8_BLOCK)
    xq = torch.empty((M, K), device=x.device, dtype=torch.float8_e4m3fn)
    sx = torch.empty((M, KB), device=x.device, dtype=torch.float32)
    R = 0 if lora_a is None else lora_a.shape[0]
    t = None if lora_a is None else torch.empty((M, R), device=x.device, dtype=torch.float32)
    if M == 0:
        return xq, sx, t
    cfg = select_config(FP8_ACT_QUANT, dtype_name(x.dtype), device_info(x.device), K=K, R=max(R, 1), M=M)
    block_r = FP8_ACT_QUANT.block_r(max(R, 1))
    a = lora_a if lora_a is not None else x
    FP8_ACT_QUANT.fn[(cdiv(M, cfg["BLOCK_M"]), max(1, cdiv(R, block_r)))](
        x, xq, sx, col_scale if col_scale is not None else sx, a, t if t is not None else sx, float(scale),
        M=M, K=K, R=R, KB=KB, stride_xm=x.stride(0), stride_xk=x.stride(1), stride_ar=a.stride(0),
        stride_ak=a.stride(1), stride_tm=R, stride_tr=1, HAS_COL_SCALE=col_scale is not None,
        FUSE_SHRINK=lora_a is not None, EXACT_CAST=interpreter_enabled(), **FP8_ACT_QUANT.launch_kwargs(cfg, block_r))
    return xq, sx, t
