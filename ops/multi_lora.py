"""Batched multi-adapter LoRA: launchers, torch.library op, functional.

Adapters live in a stacked pool: ``lora_a [SLOTS, R_MAX, K]``,
``lora_b [SLOTS, N, R_MAX]``, ``ranks [SLOTS]`` (int32; 0 = empty slot) and
``scales [SLOTS]`` (fp32). ``adapter_ids [M]`` picks a slot per token, -1 for
the base model alone. Rows are grouped by adapter on the device (a stable
sort), then two kernels run: the shrink and the base GEMM with every
adapter's expand fused into its accumulator. No host synchronisation:
the whole forward can be captured in a CUDA graph.

Backward (multi-adapter training): dt = dY·B_a (the shrink kernel on dY),
dx = dY·W0 + s·dt·A_a (the fused matmul kernel, transposed operands), and
dA / dB by one small GEMM per adapter over its sorted rows
(``_mlora_grad_kernel``): deterministic, no atomics, no host sync. The base
weight gets no gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..autotune import cache as tuning
from ..autotune import configs as cfgs
from ..kernels.multi_lora import _mlora_grad_kernel, _mlora_matmul_kernel, _mlora_shrink_kernel
from . import reference as ref
from .common import cdiv, check, dtype_name
from .backend import call_op, check_backend, compute_capability, device_info, num_sms, use_triton

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


def _sort_rows(adapter_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(sid, perm): the slot of each sorted row (ascending, -1 first) and its
    original row. A stable device sort: no host synchronisation."""
    return torch.sort(adapter_ids.to(torch.int64), stable=True)


def _drop_args(dropout_p, seeds):
    """(seeds, thresholds, inverse keep rates) for the kernels, or None."""
    if dropout_p is None:
        return None
    thr, inv = ref.multi_dropout_tables(dropout_p)
    return seeds, thr, inv


def _drop_kwargs(drop, unused: Tensor) -> dict:
    """The dropout launch arguments of the three kernels; without dropout
    ``unused`` stands in for the pointers, which the kernels then never read."""
    seeds, thr, inv = drop if drop is not None else (unused, unused, unused)
    return dict(seed_ptr=seeds, thr_ptr=thr, inv_ptr=inv, HAS_DROPOUT=drop is not None)


def _fwd_triton(x, weight, bias, lora_a, lora_b, ranks, scales, adapter_ids, slices, dropout_p, seeds):
    M, K = x.shape
    N = weight.shape[0]
    S, R = lora_b.shape[0], lora_b.shape[2]
    widths = tuple(slices) if slices else (N,)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    # Zeros: the kernels write t only inside each row's ranks, and the op's
    # output must be defined everywhere (the reference returns the same t).
    t = torch.zeros((M, len(widths) * R), device=x.device, dtype=torch.float32)
    sid, perm = _sort_rows(adapter_ids)
    if M == 0:
        return y, t, perm, sid
    bounds = _bounds(widths, x.device)
    # t = A_a·drop(x) per adapter run (sorted rows)
    _shrink(x, lora_a, ranks, perm, sid, t, bounds, K, R, S, len(widths), sliced_k=False,
            a_strides=(lora_a.stride(0), R * lora_a.stride(1), lora_a.stride(1), lora_a.stride(2)),
            drop=_drop_args(dropout_p, seeds))
    # y = x·W0ᵀ + Σ s·t·B_aᵀ + bias
    _matmul(x, weight, (weight.stride(0), weight.stride(1)), bias, perm, sid, t, lora_b,
            (lora_b.stride(0), 0, lora_b.stride(1), lora_b.stride(2)), ranks, scales, bounds, y,
            N, K, R, S, len(widths), slice_cols=True)
    return y, t, perm, sid


def _bwd_triton(dy, x, weight, lora_a, lora_b, ranks, scales, t, perm, sid, slices, needs_dx, needs_dlora,
                needs_dbias, dropout_p, seeds):
    M, K = x.shape
    N = weight.shape[0]
    S, R = lora_b.shape[0], lora_b.shape[2]
    widths = tuple(slices) if slices else (N,)
    n_sl = len(widths)
    if needs_dlora:
        da = torch.zeros(lora_a.shape, device=x.device, dtype=torch.float32)
        db = torch.zeros(lora_b.shape, device=x.device, dtype=torch.float32)
    else:
        da, db = lora_a.new_empty(0), lora_b.new_empty(0)
    dx = torch.empty((M, K), device=x.device, dtype=x.dtype) if needs_dx else x.new_empty(0)
    dbias = dy.sum(0, dtype=torch.float32) if needs_dbias else dy.new_empty(0, dtype=torch.float32)
    if M == 0 or not (needs_dx or needs_dlora):
        return dx, da.to(lora_a.dtype), db.to(lora_b.dtype), dbias
    bounds = _bounds(widths, x.device)
    drop = _drop_args(dropout_p, seeds)
    # dt = dY·B_a per run and slice (unscaled; its consumers apply s): B read as [R, N],
    # slice i reducing over its own columns only.
    dt = torch.empty((M, n_sl * R), device=x.device, dtype=torch.float32)
    _shrink(dy, lora_b, ranks, perm, sid, dt, bounds, N, R, S, n_sl, sliced_k=n_sl > 1,
            a_strides=(lora_b.stride(0), 0, lora_b.stride(2), lora_b.stride(1)))
    if needs_dlora:
        # dA = s·dtᵀ·drop(x) and dB = s·dYᵀ·t, one small GEMM per adapter over its sorted rows
        seg = torch.searchsorted(sid, torch.arange(S + 1, device=x.device, dtype=torch.int64))
        _grad(dt, x, perm, seg, ranks, scales, bounds, da, K, R, S, n_sl,
              o_strides=(da.stride(0), R * da.stride(1), da.stride(1), da.stride(2)), slice_cols=False, drop=drop)
        _grad(t, dy, perm, seg, ranks, scales, bounds, db, N, R, S, n_sl,
              o_strides=(db.stride(0), 0, db.stride(2), db.stride(1)), slice_cols=n_sl > 1)
    if needs_dx:
        # dx = dY·W0 + Σ_i drop_i(s·dt_i·A_a,i): W0 read as [K, N] (out = K), A as [K, R] per slice
        _matmul(dy, weight, (weight.stride(1), weight.stride(0)), None, perm, sid, dt, lora_a,
                (lora_a.stride(0), R * lora_a.stride(1), lora_a.stride(2), lora_a.stride(1)), ranks, scales,
                bounds, dx, K, N, R, S, n_sl, slice_cols=False, drop=drop)
    return dx, da.to(lora_a.dtype), db.to(lora_b.dtype), dbias


def shrink_split(m_tiles: int, K: int, block_k: int, sms: int) -> tuple[int, int]:
    """(splits, K per split) of the shrink: with fewer row tiles than SMs
    (decode), K is split so that about 2·SMs programs read adapters; the
    split size is a multiple of BLOCK_K. (1, K) when the row tiles suffice."""
    if m_tiles >= sms:
        return 1, K
    k_steps = cdiv(K, block_k)
    want = min(k_steps, cdiv(2 * sms, m_tiles))
    if want <= 1:
        return 1, K
    per = cdiv(k_steps, want) * block_k
    return cdiv(K, per), per


def _shrink(x, a, ranks, perm, sid, t, kb, K, R, S, n_sl, sliced_k, a_strides, drop=None):
    """t = A_a·x per run and slice into ``t`` (sorted rows). Entries outside
    the rows' ranks keep t's contents when there is no K split and become
    zero when there is one."""
    M = x.shape[0]
    dn, cc = dtype_name(x.dtype), compute_capability(x.device)
    cfg = tuning.select_memo("mlora_shrink", dn, {"K": K, "M": M}, device_info(x.device),
                             lambda: cfgs.default_mlora_shrink(M, dn, cc))
    m_tiles = cdiv(M, cfg["BLOCK_M"])
    splits, per = shrink_split(m_tiles, K, cfg["BLOCK_K"], num_sms(x.device))
    # Partial sums of a split go to separate fp32 slabs, summed in a fixed order (no atomics).
    out = t if splits == 1 else torch.zeros((splits, *t.shape), device=t.device, dtype=torch.float32)
    _mlora_shrink_kernel[(m_tiles, splits)](
        x_ptr=x, perm_ptr=perm, sid_ptr=sid, a_ptr=a, rank_ptr=ranks, kb_ptr=kb, t_ptr=out,
        M=M, K=K, R_MAX=R, SLOTS=S, K_PER_SPLIT=per, stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_as=a_strides[0], stride_a_slice=a_strides[1], stride_ar=a_strides[2], stride_ak=a_strides[3],
        stride_ts=0 if splits == 1 else out.stride(0), stride_tm=out.stride(-2), stride_tr=out.stride(-1),
        SLICED_K=sliced_k, NUM_SLICES=n_sl, BLOCK_R=BLOCK_R, **_drop_kwargs(drop, kb), **cfg.launch_kwargs())
    if splits > 1:
        torch.sum(out, dim=0, out=t)


def _matmul(x, w, w_strides, bias, perm, sid, t, b, b_strides, ranks, scales, bounds, y, N, K, R, S, n_sl,
            slice_cols, drop=None):
    M = x.shape[0]
    dn, cc = dtype_name(x.dtype), compute_capability(x.device)
    cfg = tuning.select_memo("mlora_matmul", dn, {"N": N, "K": K, "M": M}, device_info(x.device),
                             lambda: cfgs.default_lora_matmul(M, N, K, dn, cc))
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
    _mlora_matmul_kernel[grid](
        x_ptr=x, w_ptr=w, bias_ptr=bias if bias is not None else y, perm_ptr=perm, sid_ptr=sid, t_ptr=t,
        b_ptr=b, rank_ptr=ranks, scale_ptr=scales, bounds_ptr=bounds, y_ptr=y,
        M=M, N=N, K=K, R_MAX=R, SLOTS=S,
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_wn=w_strides[0], stride_wk=w_strides[1],
        stride_tm=t.stride(0), stride_tr=t.stride(1),
        stride_bs=b_strides[0], stride_b_slice=b_strides[1], stride_bn=b_strides[2], stride_br=b_strides[3],
        stride_ym=y.stride(0), stride_yn=y.stride(1), HAS_BIAS=bias is not None, SLICE_COLS=slice_cols,
        NUM_SLICES=n_sl, BLOCK_R=BLOCK_R, **_drop_kwargs(drop, bounds), **cfg.launch_kwargs())


def _grad(p, q, perm, seg, ranks, scales, bounds, o, D, R, S, n_sl, o_strides, slice_cols, drop=None):
    M = q.shape[0]
    dn, cc = dtype_name(q.dtype), compute_capability(q.device)
    cfg = tuning.select_memo("mlora_grad", dn, {"D": D, "R": R, "M": M}, device_info(q.device),
                             lambda: cfgs.default_mlora_grad(R, dn, cc))
    grid = (S, cdiv(R, cfg["BLOCK_R"]), cdiv(D, cfg["BLOCK_D"]))
    _mlora_grad_kernel[grid](
        p_ptr=p, q_ptr=q, perm_ptr=perm, seg_ptr=seg, rank_ptr=ranks, scale_ptr=scales, bounds_ptr=bounds,
        o_ptr=o, M=M, D=D, R_MAX=R, SLOTS=S, stride_pm=p.stride(0), stride_pr=p.stride(1),
        stride_qm=q.stride(0), stride_qd=q.stride(1), stride_os=o_strides[0], stride_o_slice=o_strides[1],
        stride_or=o_strides[2], stride_od=o_strides[3], SLICE_COLS=slice_cols, NUM_SLICES=n_sl,
        **_drop_kwargs(drop, bounds), **cfg.launch_kwargs())


# ---------------------------------------------------------------- torch.library ops
def _multi_lora_fwd_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                         ranks: Tensor, scales: Tensor, adapter_ids: Tensor, slices: Optional[list[int]],
                         dropout_p: Optional[Tensor], seeds: Optional[Tensor],
                         backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y [M, N], t [M, slices·R_MAX] fp32, perm [M] int64, sid [M] int64) for a 2-D x."""
    if use_triton(x.device, backend):
        return _fwd_triton(x, weight, bias, lora_a, lora_b, ranks, scales, adapter_ids, slices, dropout_p, seeds)
    return ref.multi_lora_fwd_ref(x, weight, bias, lora_a, lora_b, ranks, scales, adapter_ids, slices, dropout_p,
                                  seeds)


def _multi_lora_bwd_impl(dy: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, ranks: Tensor,
                         scales: Tensor, t: Tensor, perm: Tensor, sid: Tensor, slices: Optional[list[int]],
                         needs_dx: bool, needs_dlora: bool, needs_dbias: bool, dropout_p: Optional[Tensor],
                         seeds: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx [M, K] or empty, dA like lora_a and dB like lora_b or both empty,
    dbias [N] fp32 or empty)."""
    if use_triton(dy.device, backend):
        return _bwd_triton(dy, x, weight, lora_a, lora_b, ranks, scales, t, perm, sid, slices, needs_dx,
                           needs_dlora, needs_dbias, dropout_p, seeds)
    return ref.multi_lora_bwd_ref(dy, x, weight, lora_a, lora_b, ranks, scales, t, perm, sid, slices, needs_dx,
                                  needs_dlora, needs_dbias, dropout_p, seeds)


multi_lora_fwd = torch.library.custom_op("posttrain_kernels::multi_lora_fwd", mutates_args=())(_multi_lora_fwd_impl)
multi_lora_bwd = torch.library.custom_op("posttrain_kernels::multi_lora_bwd", mutates_args=())(_multi_lora_bwd_impl)


@multi_lora_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, ranks, scales, adapter_ids, slices, dropout_p, seeds, backend):
    M, n_sl = x.shape[0], 1 if slices is None else len(slices)
    return (x.new_empty((M, weight.shape[0])), x.new_empty((M, n_sl * lora_b.shape[2]), dtype=torch.float32),
            x.new_empty((M,), dtype=torch.int64), x.new_empty((M,), dtype=torch.int64))


@multi_lora_bwd.register_fake
def _(dy, x, weight, lora_a, lora_b, ranks, scales, t, perm, sid, slices, needs_dx, needs_dlora, needs_dbias,
      dropout_p, seeds, backend):
    dx = x.new_empty(x.shape) if needs_dx else x.new_empty(0)
    dbias = dy.new_empty((dy.shape[1],) if needs_dbias else (0,), dtype=torch.float32)
    if not needs_dlora:
        return dx, lora_a.new_empty(0), lora_b.new_empty(0), dbias
    return dx, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape), dbias


# ---------------------------------------------------------------- autograd
class MultiLoRALinearFunction(torch.autograd.Function):
    """Batched multi-adapter LoRA with gradients for x, lora_a, lora_b and
    bias (not for weight, ranks, scales, ids). Saves t (fp32, sorted order)
    and the row order only when some input needs a gradient; the dropout
    masks are regenerated from the seeds, never stored."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, ranks, scales, adapter_ids, slices, dropout_p, seeds,
                backend):
        y, t, perm, sid = call_op(multi_lora_fwd, _multi_lora_fwd_impl, x, weight, bias, lora_a, lora_b, ranks,
                                  scales, adapter_ids, slices, dropout_p, seeds, backend)
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(x, weight, lora_a, lora_b, ranks, scales, t, perm, sid, dropout_p, seeds)
        ctx.slices, ctx.backend = slices, backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(t, perm, sid)
        return y, t, perm, sid

    @staticmethod
    def backward(ctx, dy, _dt, _dperm, _dsid):
        x, weight, lora_a, lora_b, ranks, scales, t, perm, sid, dropout_p, seeds = ctx.saved_tensors
        needs_dx, needs_dbias = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        needs_dlora = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        dx, da, db, dbias = call_op(multi_lora_bwd, _multi_lora_bwd_impl, dy, x, weight, lora_a, lora_b, ranks,
                                    scales, t, perm, sid, ctx.slices, needs_dx, needs_dlora, needs_dbias,
                                    dropout_p, seeds, ctx.backend)
        return (dx if needs_dx else None, None, dbias.to(ctx.bias_dtype) if needs_dbias else None,
                da if ctx.needs_input_grad[3] else None, db if ctx.needs_input_grad[4] else None,
                None, None, None, None, None, None, None)


# ---------------------------------------------------------------- functional
def multi_lora_linear(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, ranks: Tensor, scales: Tensor,
                      adapter_ids: Tensor, bias: Optional[Tensor] = None, slices: Optional[list[int]] = None,
                      dropout_p: Optional[Tensor] = None, *, backend: Optional[str] = None) -> Tensor:
    """``y[i] = x[i]·weightᵀ + scales[a]·lora_b[a, :, :r_a]·(lora_a[a, :r_a]·x[i]) (+ bias)``
    with ``a = adapter_ids[i]`` (-1: no adapter) and ``r_a = ranks[a]``.

    ``x [..., K]``; ``adapter_ids`` has one entry per token (``x.shape[:-1]``
    flattened). Pool shapes as in this module's doc. Differentiable in x,
    lora_a, lora_b and bias (several adapters trained in one batch); the
    gradient of a slot is zero outside its rank and when no row uses it;
    ``weight`` gets none.

    ``dropout_p``: LoRA dropout per slot, a float32 ``[SLOTS]`` tensor of
    rates in [0, 1] (PEFT's ``lora_dropout`` of each adapter), applied to the
    adapter input whenever given, as ``F.dropout(training=True)`` would; each
    slice of a fused projection draws its own mask. None: no dropout.

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
    seeds = None
    if dropout_p is not None:
        check(isinstance(dropout_p, Tensor) and tuple(dropout_p.shape) == (S,) and dropout_p.dtype == torch.float32
              and dropout_p.device == x.device, "dropout_p",
              f"expected a float32 [{S}] tensor on {x.device} (one rate per slot), got {dropout_p!r:.80}")
        # device tensors, not Python ints: no host sync, graph capturable
        seeds = torch.randint(0, 2**31 - 1, (n_sl,), device=x.device, dtype=torch.int32)
    y = MultiLoRALinearFunction.apply(x.reshape(-1, K), weight, bias, lora_a, lora_b, ranks, scales,
                                      adapter_ids.reshape(-1), slices, dropout_p, seeds, check_backend(backend))[0]
    return y.reshape(*x.shape[:-1], N)
