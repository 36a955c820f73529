"""Fused-LoRA launchers: the only code of the feature that touches Triton.

A call does little Python work: everything that depends only on the call's
signature (shapes, strides, dtypes, device, flags, the environment knobs) —
which kernels, their configs, grids, splits and integer arguments — is a
``_Plan`` built once and memoised (``_PLANS``). A call looks its plan up,
allocates its outputs and launches. Validation happens once, in the
functional API (``function.py``), before any of this runs.

Forward: on sm_90 (bf16/fp16, TMA-aligned operands) the persistent TMA GEMM
(``_lora_matmul_tma_kernel``), which also computes t from its own x tiles
when it can (no dropout, r ≤ 16): one launch. Elsewhere, or with dropout, the
shrink first, then the GEMM (portable ``_lora_matmul_kernel`` below sm_90
and under the interpreter). Backward: three launches (dY pass, x pass, dx
GEMM), deterministic, no atomics.

Knobs (read when a plan is built, as the tuning cache's variables are:
after changing one in a running process, ``autotune.cache.reset()``):
``POSTTRAIN_KERNELS_GEMM`` =
``auto`` (default: TMA on sm_90 when the operands allow it), ``tma`` (also
under the interpreter, which runs tensor descriptors: how the tests cover that
kernel without a GPU) or ``portable``; ``POSTTRAIN_KERNELS_FUSE_SHRINK=0``
keeps the shrink a separate launch (to measure one against the other).

``lora_fwd_triton`` / ``lora_bwd_triton`` have the signatures of
``reference.lora_fwd_ref`` / ``lora_bwd_ref``: the op (``op.py``) calls one
or the other.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

import torch
from torch import Tensor

from ...autotune.cache import RESET_HOOKS, select_config
from ...autotune.lora import LORA_DY, LORA_MATMUL, LORA_MATMUL_TMA, LORA_SHRINK, LORA_X, MATMUL_BLOCK_R
from ...autotune.quant import FP8_BLOCK, FP8_LORA_MATMUL, FP8_LORA_MATMUL_TMA, QUANT_LORA_MATMUL
from ..backend import (GEMM_VAR, compute_capability, descriptor_copy, device_info, ensure_tma_allocator, gemm_path,
                       misalignment, num_sms, on_device, tma_addressable, tma_row_stride)
from ..common import cdiv, dtype_name
from ..dropout import dropout_threshold
from ..quant.launch import (check_tile, dequantize_triton, fp8_quantize_act, gemm_mode, w_round, weight_offset,
                            weight_pointers, weight_scalars)
from ..quant.weight import parts, structure

FUSE_VAR = "POSTTRAIN_KERNELS_FUSE_SHRINK"


# ---------------------------------------------------------------- plans
class _Launch:
    """One kernel launch minus its data: the kernel (from its spec), the grid
    and every other argument. Each kernel lists its data first (the tensors,
    then ``scale`` where the call supplies it); the plan holds the rest of
    the argument list in order, so a call is ``launch(*data)``: one
    positional launch, no keyword matching."""

    def __init__(self, spec, grid: tuple, n_data: int, kwargs: dict):
        names = [name for name, _ in spec.arguments()]
        data, rest = names[:n_data], names[n_data:]
        missing = [name for name in rest if name not in kwargs]
        if missing or any(name in kwargs for name in data):
            raise ValueError(f"{spec.name}: plan arguments do not match the kernel's ({missing or data})")
        self.kernel = spec.name
        self.tail = tuple(kwargs[name] for name in rest)
        extra = {k: v for k, v in kwargs.items() if k not in rest}  # num_warps, num_stages
        self.run = functools.partial(spec.fn[grid], **extra)

    def __call__(self, *data) -> None:
        """Only a tensor's data pointer reaches the kernel: its strides are in
        the plan, so a transposed view and its base are the same argument."""
        self.run(*data, *self.tail)


@dataclasses.dataclass(frozen=True)
class _Plan:
    launches: tuple  # _Launch per kernel, in order (None where a step is skipped)
    info: dict  # sizes the call needs for its allocations (splits, ...) and the path taken


_PLANS: dict = {}


def clear_plans() -> None:
    """Forget every memoised plan (the tuning cache calls this when it is reset)."""
    _PLANS.clear()


RESET_HOOKS.append(clear_plans)


def _remember(key: tuple, plan: _Plan) -> _Plan:
    """Memoise a plan just built (callers look ``_PLANS`` up first)."""
    if len(_PLANS) > 4096:  # many distinct shapes: start over rather than grow
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


def _env() -> tuple:
    """The two knobs of this module. Like the tuning cache's variables (pins,
    ``POSTTRAIN_KERNELS_TUNING``, the cache folder), they are read when a plan
    is built, not per call: after changing any of them in a running process,
    call ``posttrain_kernels.autotune.cache.reset()`` (``tune`` does)."""
    return os.environ.get(GEMM_VAR), os.environ.get(FUSE_VAR)


def _gemm_launch(x: Tensor, w: Tensor, t_strides: tuple, u: Tensor, has_bias: bool, R: int,
                 dropout_p: float, path: str, fuse: bool, stride_ar: int = 0) -> _Launch:
    """The launch of y [M, N] = x [M, K]·wᵀ + scale·(t [M, R]·uᵀ)(⊙ keep) + bias, w as [N, K]; the
    call passes ``scale`` (dropout's 1/(1-p) included)."""
    M, K = x.shape
    N = w.shape[0]
    has_dropout = dropout_p > 0.0
    common = dict(M=M, N=N, K=K, R=R, stride_tm=t_strides[0], stride_tr=t_strides[1],
                  stride_un=u.stride(0), stride_ur=u.stride(1), drop_threshold=dropout_threshold(dropout_p),
                  HAS_BIAS=has_bias, HAS_DROPOUT=has_dropout)
    if path == "tma":
        w_nmajor = w.stride(0) == 1 and w.stride(1) != 1
        cfg = select_config(LORA_MATMUL_TMA, dtype_name(x.dtype), device_info(x.device),
                            N=N, K=K, layout="wT" if w_nmajor else "w", M=M)
        tiles = cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"])
        programs = max(1, min(tiles, num_sms(x.device)))
        return _Launch(LORA_MATMUL_TMA, (programs,), 9, dict(
            common, num_programs=programs, stride_xm=x.stride(0), stride_w=w.stride(1) if w_nmajor else w.stride(0),
            stride_ar=stride_ar, stride_ym=N, W_NMAJOR=w_nmajor, FUSE_SHRINK=fuse,
            **LORA_MATMUL_TMA.launch_kwargs(cfg)))
    cfg = select_config(LORA_MATMUL, dtype_name(x.dtype), device_info(x.device),
                        N=N, K=K, layout="w" if w.stride(1) == 1 else "wT", M=M)
    return _Launch(LORA_MATMUL, (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),), 8, dict(
        common, stride_xm=x.stride(0), stride_xk=x.stride(1), stride_wn=w.stride(0), stride_wk=w.stride(1),
        stride_ym=N, stride_yn=1, EVEN_K=K % cfg["BLOCK_K"] == 0, **LORA_MATMUL.launch_kwargs(cfg)))


def _decoding_gemm_launch(x: Tensor, w, transposed: bool, u: Tensor, has_bias: bool, R: int,
                          dropout_p: float, fuse: bool, a_strides: tuple = (0, 0)) -> _Launch:
    """The launch of y [M, N] = x [M, K]·wᵀ + scale·(t [M, R]·uᵀ)(⊙ keep) + bias with w a quantized
    weight [WN, WK] read as [N, K] (forward) or, ``transposed``, as [K, N] (dx), decoded in the main
    loop; ``fuse``: t = x·aᵀ from the same tiles (a [R, K], ``a_strides``). The call passes the
    tensors, then ``scale`` and the weight's scale offset."""
    M, K = x.shape
    WN, WK = w.shape
    N = WK if transposed else WN
    cfg = select_config(QUANT_LORA_MATMUL, dtype_name(x.dtype), device_info(x.device),
                        N=N, K=K, layout="wT" if transposed else "w", M=M)
    check_tile(w, cfg["BLOCK_N"] if transposed else cfg["BLOCK_K"], QUANT_LORA_MATMUL.name)
    return _Launch(QUANT_LORA_MATMUL, (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),), 14, dict(
        M=M, N=N, K=K, R=R, WN=WN, WK=WK, stride_xm=x.stride(0), stride_xk=x.stride(1), stride_tm=R, stride_tr=1,
        stride_un=u.stride(0), stride_ur=u.stride(1), stride_ar=a_strides[0], stride_ak=a_strides[1],
        stride_ym=N, stride_yn=1, drop_threshold=dropout_threshold(dropout_p), W_NMAJOR=transposed,
        W_ROUND=w_round(w, x.dtype),
        HAS_BIAS=has_bias, HAS_DROPOUT=dropout_p > 0.0, FUSE_SHRINK=fuse, EVEN_K=K % cfg["BLOCK_K"] == 0,
        **weight_scalars(w), **QUANT_LORA_MATMUL.launch_kwargs(cfg)))


def _fp8_gemm_launch(xq: Tensor, w, transposed: bool, u: Tensor, has_bias: bool, R: int, dropout_p: float,
                     dtype: torch.dtype, choice: Optional[str]) -> _Launch:
    """The launch of the fp8 tensor-core GEMM: y [M, N] (``dtype``) = Σ_kb (x_q·w_qᵀ)·sx·sw + scale·t·uᵀ
    (⊙ keep) + bias, x_q [M, K] e4m3 with 1×128 scales, w an fp8 weight [WN, WK] read as [N, K]
    (forward) or, ``transposed``, as [K, N] (dx: its per-row scales, if that is its scaling, are then
    folded into x). On sm_90 (``choice``: ``POSTTRAIN_KERNELS_GEMM``, as ``gemm_path``) x_q and the
    weight go through TMA where a descriptor can read them (16-byte rows and base). The call passes
    the tensors, then ``scale``."""
    M, K = xq.shape
    WN, WK = w.shape
    N = WK if transposed else WN
    scale_cols = cdiv(WK, FP8_BLOCK)  # the row stride of a 128×128 scale grid
    w_scale = (0 if transposed else 1) if w.block is None else 2
    common = dict(M=M, N=N, K=K, R=R, KB=cdiv(K, FP8_BLOCK), stride_tm=R, stride_tr=1, stride_un=u.stride(0),
                  stride_ur=u.stride(1), stride_ym=N, drop_threshold=dropout_threshold(dropout_p), W_SCALE=w_scale,
                  HAS_BIAS=has_bias, HAS_DROPOUT=dropout_p > 0.0, stride_sn=1 if transposed else scale_cols,
                  stride_sk=scale_cols if transposed else 1)
    choice = (choice or "auto").lower()
    tma = choice != "portable" and (choice == "tma" or (compute_capability(xq.device) or 0) >= 90) \
        and K % 16 == 0 and WK % 16 == 0 and w.data.data_ptr() % 16 == 0
    layout = "wT" if transposed else "w"
    if tma:
        cfg = select_config(FP8_LORA_MATMUL_TMA, dtype_name(dtype), device_info(xq.device), N=N, K=K, layout=layout,
                            M=M)
        programs = max(1, min(cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]), num_sms(xq.device)))
        return _Launch(FP8_LORA_MATMUL_TMA, (programs,), 10, dict(
            common, num_programs=programs, stride_w=WK, W_NMAJOR=transposed,
            **FP8_LORA_MATMUL_TMA.launch_kwargs(cfg)))
    cfg = select_config(FP8_LORA_MATMUL, dtype_name(dtype), device_info(xq.device), N=N, K=K, layout=layout, M=M)
    # transposed: reduction over W's rows, element (n, k) of the [K, N] view at k·WK + n
    return _Launch(FP8_LORA_MATMUL, (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),), 10, dict(
        common, stride_wn=1 if transposed else WK, stride_wk=WK if transposed else 1,
        **FP8_LORA_MATMUL.launch_kwargs(cfg)))


def _shrink_launch(x: Tensor, a: Tensor, dropout_p: float) -> _Launch:
    """The launch of t [M, R] fp32 = scale · drop(x) [M, K] · aᵀ, a as [R, K] (any strides); the call
    passes ``scale`` (dropout's 1/(1-p) included)."""
    M, K = x.shape
    R = a.shape[0]
    cfg = select_config(LORA_SHRINK, dtype_name(x.dtype), device_info(x.device),
                        K=K, R=R, layout="a" if a.stride(1) == 1 else "aT", M=M)
    block_r = LORA_SHRINK.block_r(R)
    return _Launch(LORA_SHRINK, (cdiv(M, cfg["BLOCK_M"]), cdiv(R, block_r)), 5, dict(
        M=M, K=K, R=R, stride_xm=x.stride(0), stride_xk=x.stride(1), stride_ar=a.stride(0), stride_ak=a.stride(1),
        stride_tm=R, stride_tr=1, drop_threshold=dropout_threshold(dropout_p), HAS_DROPOUT=dropout_p > 0.0,
        **LORA_SHRINK.launch_kwargs(cfg, block_r)))


def _seed(seed: Optional[Tensor], dropout_p: float, dummy: Tensor) -> Tensor:
    return seed if dropout_p > 0.0 else dummy


# ---------------------------------------------------------------- forward
def _fwd_plan(x, weight, lora_a, lora_b, bias, dropout_p, env, mode=None) -> _Plan:
    M, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    if mode == "inloop":  # decoded in the main loop, which can also compute t
        fuse = dropout_p == 0.0 and R <= MATMUL_BLOCK_R and (env[1] or "1") != "0"
        shrink = None if fuse else _shrink_launch(x, lora_a, dropout_p)
        gemm = _decoding_gemm_launch(x, weight, False, lora_b, bias is not None, R, 0.0, fuse, lora_a.stride())
        return _Plan((shrink, gemm), {"tma": False, "path": "inloop"})
    if mode == "mma":  # x quantised by a pre-pass, which also computes t (without dropout)
        shrink = None if dropout_p == 0.0 else _shrink_launch(x, lora_a, dropout_p)
        gemm = _fp8_gemm_launch(x, weight, False, lora_b, bias is not None, R, 0.0, x.dtype, env[0])
        return _Plan((shrink, gemm), {"tma": False, "path": "mma"})
    path = gemm_path(x, weight, N, env[0])
    fuse = (path == "tma" and dropout_p == 0.0 and R <= MATMUL_BLOCK_R and (env[1] or "1") != "0")
    # The fused shrink reads A through a descriptor, in x's dtype: A as it is when a descriptor can
    # address it, else a copy (R·K elements) in x's dtype with 16-byte rows (K=60: a stride of 64).
    a_stride = None if not fuse or (lora_a.dtype == x.dtype and tma_addressable(lora_a)) else \
        tma_row_stride(K, x.dtype)
    shrink = None if fuse else _shrink_launch(x, lora_a, dropout_p)
    gemm = _gemm_launch(x, weight, (R, 1), lora_b, bias is not None, R, 0.0, path, fuse,
                        stride_ar=lora_a.stride(0) if a_stride is None else a_stride)
    return _Plan((shrink, gemm), {"tma": path == "tma", "path": path, "a_stride": a_stride})


def _weight_key(x: Tensor, weight, *others) -> tuple:
    """What a plan depends on of the weight: a dense one's shape, strides and misalignment (with
    the other TMA operands'), a quantized one's structure."""
    if isinstance(weight, Tensor):
        return weight.shape, weight.stride(), misalignment(x, weight, *others)
    return structure(weight), misalignment(*parts(weight)[1])


@on_device
def lora_fwd_triton(x, weight, lora_a, lora_b, bias, scale, dropout_p, seed):
    """(y [M, N] in x.dtype, t [M, R] fp32) for a 2-D x [M, K]; ``weight`` a dense [N, K] tensor or
    a quantized one (``ops/quant``: decoded in the GEMM up to a few hundred tokens, above either
    through the fp8 tensor-core GEMM or once into a dense buffer: ``quant/launch.py: gemm_mode``)."""
    M, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    t = torch.empty((M, R), device=x.device, dtype=torch.float32)
    if M == 0:
        return y, t
    mode = None
    if not isinstance(weight, Tensor):
        mode = gemm_mode(weight, x, M)
        if mode == "buffer":
            weight, mode = dequantize_triton(weight, x.dtype), None
    key = ("fwd", x.shape, lora_a.shape, x.stride(), lora_a.stride(), lora_b.stride(), x.dtype, lora_a.dtype,
           lora_b.dtype, None if bias is None else bias.dtype, dropout_p, x.device, mode,
           _weight_key(x, weight, lora_a))
    plan = _PLANS.get(key) or _remember(key, _fwd_plan(x, weight, lora_a, lora_b, bias, dropout_p, _env(), mode))
    shrink, gemm = plan.launches
    if shrink is not None:
        shrink(x, lora_a, t, _seed(seed, dropout_p, t), 1.0 / (1.0 - dropout_p))
    bias_t = bias.contiguous() if bias is not None else y  # the kernels read bias at unit stride
    if plan.info["path"] == "inloop":
        gemm(x, *weight_pointers(weight), t, lora_b, lora_a, bias_t, y, y, float(scale), weight_offset(weight))
    elif plan.info["path"] == "mma":
        xq, sx, t_fused = fp8_quantize_act(x, lora_a=None if shrink is not None else lora_a)
        t = t if shrink is not None else t_fused
        data, w_scale = weight_pointers(weight)[:2]
        ensure_tma_allocator()
        gemm(xq, sx, data, w_scale, t, lora_b, bias_t, y, y, float(scale))
    elif plan.info["tma"]:
        ensure_tma_allocator()
        a_stride = plan.info["a_stride"]
        a16 = lora_a if a_stride is None else descriptor_copy(lora_a, x.dtype, a_stride)
        gemm(x, weight, t, lora_b, a16, bias_t, y, y, float(scale))
    else:
        gemm(x, weight, t, lora_b, bias_t, y, y, float(scale))
    return y, t


# ---------------------------------------------------------------- backward
def _bwd_plan(dy, x, weight, lora_a, lora_b, dropout_p, needs_dx, needs_dbias, env, mode=None) -> _Plan:
    M, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    block_r = LORA_DY.block_r(R)  # = LORA_X.block_r(R)
    r_chunks = cdiv(R, block_r)
    dtype, dev = dtype_name(x.dtype), device_info(x.device)
    sms = num_sms(x.device)
    # dY pass: each program owns whole row blocks (its dt rows, one dB/dbias slab). The slabs
    # cost 2·split·N·R·4 bytes of traffic (written, then summed) against dY's M·N·2: the split
    # stays ≤ M/(8·R), so they add at most half of dY's bytes, and ≤ SMs/2, which streams dY
    # with enough programs in flight (neither bound measured on a GPU yet).
    cfg = select_config(LORA_DY, dtype, dev, N=N, R=R, M=M)
    m_blocks = cdiv(M, cfg["BLOCK_M"])
    want = max(1, min(m_blocks, sms // 2, M // (8 * R)))
    rows_per_split = cdiv(m_blocks, want) * cfg["BLOCK_M"]
    split = cdiv(M, rows_per_split)
    dy_pass = _Launch(LORA_DY, (split, r_chunks), 7, dict(
        M=M, N=N, R=R, rows_per_split=rows_per_split,
        stride_dym=dy.stride(0), stride_dyn=dy.stride(1), stride_bn=lora_b.stride(0), stride_br=lora_b.stride(1),
        stride_tm=R, stride_tr=1, stride_dtm=R, stride_dtr=1, stride_dbs=N * R, stride_dbn=R, stride_dbr=1,
        stride_dbias_s=N, HAS_DBIAS=needs_dbias, **LORA_DY.launch_kwargs(cfg, block_r)))
    # x pass: dA over every row, one program per BLOCK_K columns, then the slab sums.
    cfg = select_config(LORA_X, dtype, dev, K=K, R=R, M=M)
    k_programs = cdiv(K, cfg["BLOCK_K"])
    x_pass = _Launch(LORA_X, (k_programs + cdiv(N, cfg["BLOCK_N"]), r_chunks), 8, dict(
        M=M, K=K, R=R, N=N, SPLIT=split, k_programs=k_programs,
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_dtm=R, stride_dtr=1, stride_dar=K, stride_dak=1,
        stride_dbs=N * R, stride_dbn=R, stride_dbr=1, stride_dbias_s=N,
        scale=1.0 / (1.0 - dropout_p), drop_threshold=dropout_threshold(dropout_p),
        HAS_DROPOUT=dropout_p > 0.0, HAS_DBIAS=needs_dbias, **LORA_X.launch_kwargs(cfg, block_r)))
    # dx = dY·W0 + (dt·A)⊙keep/(1-p): W0 [N, K] read as a [K, N] "w", A [R, K] as a [K, R] "u".
    dx = None
    path = "portable"
    if needs_dx and mode == "inloop":
        path = "inloop"
        dx = _decoding_gemm_launch(dy, weight, True, lora_a.t(), False, R, dropout_p, False)
    elif needs_dx and mode == "mma":
        path = "mma"
        dx = _fp8_gemm_launch(dy, weight, True, lora_a.t(), False, R, dropout_p, dy.dtype, env[0])
    elif needs_dx:
        wt = weight.t()
        path = gemm_path(dy, wt, K, env[0])
        dx = _gemm_launch(dy, wt, (R, 1), lora_a.t(), False, R, dropout_p, path, False)
    return _Plan((dy_pass, x_pass, dx), {"tma": path == "tma", "path": path, "split": split})


@on_device
def lora_bwd_triton(dy, x, weight, lora_a, lora_b, t, scale, dropout_p, seed, needs_dx, needs_dbias):
    """(dx [M, K] or empty, dA [R, K], dB [N, R] in the adapters' dtypes, dbias [N] fp32 or empty);
    ``weight`` dense or 4-bit, as in the forward."""
    M, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    if M == 0:
        return (x.new_empty((0, K)) if needs_dx else x.new_empty(0), torch.zeros_like(lora_a),
                torch.zeros_like(lora_b), dy.new_zeros((N,) if needs_dbias else (0,), dtype=torch.float32))
    mode = None
    if not isinstance(weight, Tensor):
        mode = gemm_mode(weight, dy, M) if needs_dx else "none"
        if mode == "buffer":
            weight, mode = dequantize_triton(weight, x.dtype), None
    key = ("bwd", x.shape, lora_a.shape, dy.stride(), x.stride(), lora_a.stride(), lora_b.stride(), x.dtype,
           lora_a.dtype, lora_b.dtype, dropout_p, needs_dx, needs_dbias, x.device, mode, _weight_key(dy, weight))
    plan = _PLANS.get(key) or _remember(
        key, _bwd_plan(dy, x, weight, lora_a, lora_b, dropout_p, needs_dx, needs_dbias, _env(), mode))
    dy_pass, x_pass, dx_gemm = plan.launches
    dev, f32 = x.device, torch.float32
    split = plan.info["split"]
    dt = torch.empty((M, R), device=dev, dtype=f32)
    db_part = torch.empty((split, N, R), device=dev, dtype=f32)
    da = torch.empty((R, K), device=dev, dtype=lora_a.dtype)  # the x pass writes the adapters' dtype
    db = torch.empty((N, R), device=dev, dtype=lora_b.dtype)
    if needs_dbias:
        dbias_part = torch.empty((split, N), device=dev, dtype=f32)
        dbias = torch.empty((N,), device=dev, dtype=f32)
    else:
        dbias_part, dbias = db_part, db_part.new_empty(0)  # not read
    dy_pass(dy, lora_b, t, dt, db_part, dbias_part, float(scale))
    x_pass(x, dt, da, _seed(seed, dropout_p, dt), db_part, db, dbias_part, dbias if needs_dbias else dt)
    if dx_gemm is not None:
        # W0 and A are read transposed: the plan has their strides, the kernel takes their data.
        dx = torch.empty((M, K), device=x.device, dtype=x.dtype)
        if plan.info["path"] == "inloop":
            dx_gemm(dy, *weight_pointers(weight), dt, lora_a, dx, dx, dx, _seed(seed, dropout_p, dx),
                    1.0 / (1.0 - dropout_p), weight_offset(weight))
        elif plan.info["path"] == "mma":
            data, w_scale = weight_pointers(weight)[:2]
            # dY quantised per 1×128 block along N, a per-row weight scale (N of them) folded in first
            dyq, sdy, _ = fp8_quantize_act(dy, col_scale=w_scale if weight.block is None else None)
            ensure_tma_allocator()
            dx_gemm(dyq, sdy, data, w_scale, dt, lora_a, dx, dx, _seed(seed, dropout_p, dx), 1.0 / (1.0 - dropout_p))
        elif plan.info["tma"]:
            ensure_tma_allocator()
            dx_gemm(dy, weight, dt, lora_a, dx, dx, dx, _seed(seed, dropout_p, dx), 1.0 / (1.0 - dropout_p))
        else:
            dx_gemm(dy, weight, dt, lora_a, dx, dx, _seed(seed, dropout_p, dx), 1.0 / (1.0 - dropout_p))
    else:
        dx = x.new_empty(0)
    return dx, da, db, dbias


# ---------------------------------------------------------------- single kernels (tuning, tests)
@on_device
def lora_shrink(x: Tensor, a: Tensor, scale: float, dropout_p: float = 0.0,
                seed: Optional[Tensor] = None) -> Tensor:
    """t [M, R] fp32 = scale · drop(x) [M, K] · aᵀ, with a given as [R, K] (any strides)."""
    t = torch.empty((x.shape[0], a.shape[0]), device=x.device, dtype=torch.float32)
    if x.shape[0]:
        _shrink_launch(x, a, dropout_p)(x, a, t, _seed(seed, dropout_p, t), float(scale) / (1.0 - dropout_p))
    return t
