"""Launchers of the quantized-base kernels that stand alone (the 4-bit decode into a buffer, the
multi-adapter forward over a 4-bit weight) and the rule that picks where a 4-bit GEMM decodes.

The fused-LoRA GEMM over a 4-bit weight is a launch of ``ops/lora/launch.py``'s plans (it
shares their shrink and backward passes); the multi-adapter one is called from
``ops/multi_lora/launch.py``'s ``matmul``.

Where the weight is decoded (``POSTTRAIN_KERNELS_QUANT_GEMM``): ``auto`` (default) decodes in the
GEMM's main loop up to ``INLOOP_MAX_M`` tokens (``POSTTRAIN_KERNELS_QUANT_INLOOP_MAX_M`` moves the
crossover) and above it once into a buffer that the dense kernels read; ``inloop`` and ``buffer``
force one (``inloop`` only where the weight's rows split into whole blocks of the tiles; others
always take the buffer). Read per call: the choice depends on the token count, which plans do not
key on exactly.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from ...autotune.cache import select_config
from ...autotune.quant import INLOOP_MAX_M, NF4_DEQUANT, NF4_MULTI_LORA_MATMUL
from ..backend import device_info
from ..common import cdiv, dtype_name
from .nf4 import NF4Weight

QUANT_GEMM_VAR, INLOOP_VAR = "POSTTRAIN_KERNELS_QUANT_GEMM", "POSTTRAIN_KERNELS_QUANT_INLOOP_MAX_M"
_ROUND = {torch.float16: 1, torch.bfloat16: 2}


def decode_in_loop(w: NF4Weight, M: int) -> bool:
    """Whether a GEMM over M tokens decodes ``w`` in its main loop (else into a buffer first). Only
    a weight whose rows split into whole blocks of the GEMMs' tiles can (in-features a multiple of
    the blocksize, a blocksize of at least 64: ``aligned``); the token count decides the rest."""
    choice = (os.environ.get(QUANT_GEMM_VAR) or "auto").lower()
    if choice not in ("auto", "inloop", "buffer"):
        raise ValueError(f"{QUANT_GEMM_VAR} must be auto, inloop or buffer, got {choice!r}")
    if choice == "buffer" or not aligned(w, 64):
        return False
    return choice == "inloop" or M <= int(os.environ.get(INLOOP_VAR) or INLOOP_MAX_M)


def w_round(w: NF4Weight, dtype: torch.dtype) -> int:
    """The kernels' W_ROUND: the weight's own 16-bit dtype when it differs from the GEMM's (the
    decoded value is rounded to it first), else 0."""
    return _ROUND.get(w.dtype, 0) if w.dtype != dtype else 0


def nf4_pointers(w: NF4Weight) -> tuple:
    """(packed, absmax, code, absmax2, code2) as the kernels take them (the first three stand in for
    the nested tables when there are none: never read then)."""
    s = w.nested
    return (w.packed, w.absmax, w.code) + ((w.absmax, w.code) if s is None else (s.absmax2, s.code2))


def nf4_scalars(w: NF4Weight) -> dict:
    """The integer and flag arguments every 4-bit kernel takes."""
    s = w.nested
    return dict(blocksize=w.blocksize, blocksize2=1 if s is None else s.blocksize2, NESTED=s is not None)


def nf4_offset(w: NF4Weight) -> float:
    return 0.0 if w.nested is None else float(w.nested.offset)


def aligned(w: NF4Weight, cols: int) -> bool:
    """Whether tiles ``cols`` wide (at multiples of ``cols``) of each row of ``w`` are whole bytes
    inside one block: what the GEMMs' decode needs (``nf4_tile``'s ALIGNED)."""
    return w.shape[1] % w.blocksize == 0 and w.blocksize % cols == 0


def check_tile(w: NF4Weight, cols: int, kernel: str) -> None:
    """A GEMM's config must cut the weight's rows into whole blocks (a pinned config may not)."""
    if not aligned(w, cols):
        raise ValueError(f"{kernel}: a {cols}-wide weight tile does not divide the blocksize {w.blocksize} of "
                         f"a [{w.shape[0]}, {w.shape[1]}] weight: pin a config whose tiles do")


def dequantize_triton(w: NF4Weight, dtype: torch.dtype) -> Tensor:
    """The dense ``[out, in]`` weight in ``dtype``, decoded by ``_nf4_dequant_kernel``: equal to
    ``ops.quant.dequantize(w, dtype)`` element for element."""
    WN, WK = w.shape
    out = torch.empty((WN, WK), device=w.packed.device, dtype=dtype)
    cfg = select_config(NF4_DEQUANT, dtype_name(dtype), device_info(out.device), N=WN, K=WK)
    NF4_DEQUANT.fn[(cdiv(WN, cfg["BLOCK_N"]), cdiv(WK, cfg["BLOCK_K"]))](
        *nf4_pointers(w), out, nf4_offset(w), N=WN, K=WK, stride_on=out.stride(0),
        ALIGNED=aligned(w, cfg["BLOCK_K"]), W_ROUND=w_round(w, dtype), **nf4_scalars(w),
        **NF4_DEQUANT.launch_kwargs(cfg))
    return out


def nf4_multi_lora_matmul(x: Tensor, w: NF4Weight, bias, rows, t: Tensor, b, stack, y: Tensor) -> None:
    """``ops/multi_lora/launch.py: matmul``'s forward over a 4-bit weight [N, K], decoded in the main
    loop: y[perm] = x[perm]·Wᵀ + Σ_runs Σ_slices s·t·b_a,iᵀ (+ bias), ``b`` read as [N, R]."""
    M, K = x.shape
    N = w.shape[0]
    cfg = select_config(NF4_MULTI_LORA_MATMUL, dtype_name(x.dtype), device_info(x.device), N=N, K=K, M=M)
    check_tile(w, cfg["BLOCK_K"], NF4_MULTI_LORA_MATMUL.name)
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
    NF4_MULTI_LORA_MATMUL.fn[grid](
        x, *nf4_pointers(w), bias.contiguous() if bias is not None else y, rows.perm, rows.sid, t, b.data,
        stack.ranks, stack.scales, stack.bounds, y, nf4_offset(w),
        M=M, N=N, K=K, R_MAX=stack.max_rank, SLOTS=stack.slots,
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_tm=t.stride(0), stride_tr=t.stride(1),
        stride_bs=b.stride_s, stride_bn=b.stride_r, stride_br=b.stride_c, stride_ym=y.stride(0),
        stride_yn=y.stride(1), W_ROUND=w_round(w, x.dtype),
        HAS_BIAS=bias is not None, SLICED_OUTPUT=stack.num_slices > 1, NUM_SLICES=stack.num_slices,
        EVEN_K=K % cfg["BLOCK_K"] == 0, **nf4_scalars(w), **NF4_MULTI_LORA_MATMUL.launch_kwargs(cfg))
