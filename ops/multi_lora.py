"""Batched multi-adapter LoRA: launchers, torch.library op, functional.

Adapters live in a stacked pool: ``lora_a [SLOTS, R_MAX, K]``,
``lora_b [SLOTS, N, R_MAX]``, ``ranks [SLOTS]`` (int32; 0 = empty slot) and
``scales [SLOTS]`` (fp32). ``adapter_ids [M]`` picks a slot per token, -1 for
the base model alone. Rows are grouped by adapter on the device (a stable
sort), then two kernels run: the shrink and the base GEMM with every
adapter's expand fused into its accumulator. No host synchronisation:
the whole forward can be captured in a CUDA graph. Inference only (no
backward).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..autotune import cache as tuning
from ..autotune import configs as cfgs
from ..kernels.multi_lora import _mlora_matmul_kernel, _mlora_shrink_kernel
from . import reference as ref
from .common import cdiv, check, dtype_name
from .backend import call_op, check_backend, compute_capability, device_info, use_triton

BLOCK_R = 16  # rank step of both kernels: the tl.dot minimum


_BOUNDS: dict = {}


def _bounds(widths: tuple, device: torch.device) -> Tensor:
    """Slice boundaries on the device, made once per (widths, device): a
    host-to-device copy inside a CUDA-graph capture would not be allowed."""
    key = (widths, str(device))
    if key not in _BOUNDS:
        edges = [0]
        for w in widths:
            edges.append(edges[-1] + w)
        _BOUNDS[key] = torch.tensor(edges, dtype=torch.int32, device=device)
    return _BOUNDS[key]


def _launch(x, weight, bias, lora_a, lora_b, ranks, scales, adapter_ids, slices) -> Tensor:
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return y
    S, R = lora_b.shape[0], lora_b.shape[2]
    widths = tuple(slices) if slices else (N,)
    sid, perm = torch.sort(adapter_ids.to(torch.int64), stable=True)
    t = torch.empty((M, len(widths) * R), device=x.device, dtype=torch.float32)
    dn, cc, info = dtype_name(x.dtype), compute_capability(x.device), device_info(x.device)
    scfg = tuning.select_memo("mlora_shrink", dn, {"K": K, "M": M}, info,
                              lambda: cfgs.default_mlora_shrink(M, dn, cc))
    _mlora_shrink_kernel[(cdiv(M, scfg["BLOCK_M"]),)](
        x_ptr=x, perm_ptr=perm, sid_ptr=sid, a_ptr=lora_a, rank_ptr=ranks, t_ptr=t, M=M, K=K, R_MAX=R, SLOTS=S,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_as=lora_a.stride(0), stride_ar=lora_a.stride(1), stride_ak=lora_a.stride(2),
        stride_tm=t.stride(0), stride_tr=t.stride(1), NUM_SLICES=len(widths), BLOCK_R=BLOCK_R,
        **scfg.launch_kwargs())
    mcfg = tuning.select_memo("mlora_matmul", dn, {"N": N, "K": K, "M": M}, info,
                              lambda: cfgs.default_lora_matmul(M, N, K, dn, cc))
    grid = (cdiv(M, mcfg["BLOCK_M"]) * cdiv(N, mcfg["BLOCK_N"]),)
    _mlora_matmul_kernel[grid](
        x_ptr=x, w_ptr=weight, bias_ptr=bias if bias is not None else y, perm_ptr=perm, sid_ptr=sid, t_ptr=t,
        b_ptr=lora_b, rank_ptr=ranks, scale_ptr=scales, bounds_ptr=_bounds(widths, x.device), y_ptr=y,
        M=M, N=N, K=K, R_MAX=R, SLOTS=S,
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_wn=weight.stride(0), stride_wk=weight.stride(1),
        stride_tm=t.stride(0), stride_tr=t.stride(1),
        stride_bs=lora_b.stride(0), stride_bn=lora_b.stride(1), stride_br=lora_b.stride(2),
        stride_ym=y.stride(0), stride_yn=y.stride(1), HAS_BIAS=bias is not None, NUM_SLICES=len(widths),
        BLOCK_R=BLOCK_R, **mcfg.launch_kwargs())
    return y


def _multi_lora_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                     ranks: Tensor, scales: Tensor, adapter_ids: Tensor, slices: Optional[list[int]],
                     backend: str) -> Tensor:
    if use_triton(x.device, backend):
        return _launch(x, weight, bias, lora_a, lora_b, ranks, scales, adapter_ids, slices)
    return ref.multi_lora_linear_ref(x, weight, bias, lora_a, lora_b, ranks, scales, adapter_ids, slices)


multi_lora_op = torch.library.custom_op("posttrain_kernels::multi_lora_linear", mutates_args=())(_multi_lora_impl)


@multi_lora_op.register_fake
def _(x, weight, bias, lora_a, lora_b, ranks, scales, adapter_ids, slices, backend):
    return x.new_empty((x.shape[0], weight.shape[0]))


def multi_lora_linear(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, ranks: Tensor, scales: Tensor,
                      adapter_ids: Tensor, bias: Optional[Tensor] = None, slices: Optional[list[int]] = None, *,
                      backend: Optional[str] = None) -> Tensor:
    """``y[i] = x[i]·weightᵀ + scales[a]·lora_b[a, :, :r_a]·(lora_a[a, :r_a]·x[i]) (+ bias)``
    with ``a = adapter_ids[i]`` (-1: no adapter) and ``r_a = ranks[a]``.

    ``x [..., K]``; ``adapter_ids`` has one entry per token (``x.shape[:-1]``
    flattened). Pool shapes as in this module's doc. Inference only.

    ``slices``: output widths of fused projections sharing x (fused q/k/v,
    e.g. ``[4096, 1024, 1024]`` with GQA), each with its own adapter: then
    ``lora_a`` is ``[SLOTS, len(slices)·R_MAX, K]`` (slice i at rows
    ``i·R_MAX``), ``lora_b`` ``[SLOTS, N, R_MAX]`` (row n belongs to the slice
    of column n), ``ranks`` / ``scales`` ``[len(slices), SLOTS]``. One launch
    for all slices.
    """
    for name, v in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        check(isinstance(v, Tensor) and v.is_floating_point(), name, "expected a floating-point tensor")
    check(weight.dim() == 2, "weight", f"expected [out, in], got shape {tuple(weight.shape)}")
    N, K = weight.shape
    check(x.shape[-1] == K, "x", f"last dim must be in_features={K}, got shape {tuple(x.shape)}")
    check(weight.dtype == x.dtype, "weight", f"dtype must match x ({x.dtype}), got {weight.dtype}")
    n_sl = 1
    if slices is not None:
        slices = [int(w) for w in slices]
        n_sl = len(slices)
        check(n_sl >= 1 and all(w > 0 for w in slices) and sum(slices) == N, "slices",
               f"expected positive widths summing to out_features={N}, got {slices}")
    check(lora_b.dim() == 3 and lora_b.shape[1] == N, "lora_b",
           f"expected [slots, {N}, max_rank], got shape {tuple(lora_b.shape)}")
    S, R = lora_b.shape[0], lora_b.shape[2]
    check(tuple(lora_a.shape) == (S, n_sl * R, K), "lora_a",
           f"expected {(S, n_sl * R, K)}, got shape {tuple(lora_a.shape)}")
    rs_shape = (S,) if slices is None else (n_sl, S)
    check(tuple(ranks.shape) == rs_shape and ranks.dtype == torch.int32, "ranks",
           f"expected int32 {list(rs_shape)}, got {ranks.dtype} {tuple(ranks.shape)}")
    check(tuple(scales.shape) == rs_shape and scales.dtype == torch.float32, "scales",
           f"expected float32 {list(rs_shape)}, got {scales.dtype} {tuple(scales.shape)}")
    M = x.numel() // K
    check(adapter_ids.numel() == M and not adapter_ids.is_floating_point(), "adapter_ids",
           f"expected {M} integer ids (one per token), got {adapter_ids.dtype} {tuple(adapter_ids.shape)}")
    if bias is not None:
        check(tuple(bias.shape) == (N,), "bias", f"expected [{N}], got shape {tuple(bias.shape)}")
    for name, v in (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b), ("ranks", ranks),
                    ("scales", scales), ("adapter_ids", adapter_ids), ("bias", bias)):
        if v is not None:
            check(v.device == x.device, name, f"must be on x's device {x.device}, got {v.device}")
    x2d = x.reshape(-1, K)
    y = call_op(multi_lora_op, _multi_lora_impl, x2d, weight, bias, lora_a, lora_b, ranks, scales,
                adapter_ids.reshape(-1), slices, check_backend(backend))
    return y.reshape(*x.shape[:-1], N)
