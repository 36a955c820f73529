"""MoE dispatch and combine in plain PyTorch: the references of the ops, with
the launchers' signatures, and flaxformer's one-hot formulation (a benchmark
baseline)."""
from __future__ import annotations

from typing import Optional

import torch


def _valid(token_idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Slots holding a token: -1 is empty and, as in the kernels, so is any
    index outside [0, num_tokens)."""
    return (token_idx >= 0) & (token_idx < num_tokens)


def moe_dispatch_ref(x: torch.Tensor, token_idx: torch.Tensor) -> torch.Tensor:
    """[E, C, d]: x[token_idx], zero rows for empty slots."""
    valid = _valid(token_idx, x.shape[0])
    out = x.new_zeros((*token_idx.shape, x.shape[-1]))
    out[valid] = x[token_idx[valid]]
    return out


def moe_combine_ref(expert_out: torch.Tensor, token_idx: torch.Tensor, gates: torch.Tensor,
                    num_tokens: int) -> torch.Tensor:
    """[n, d]: y[t] = Σ gate·expert_out over the slots holding t, in fp32."""
    E, C, d = expert_out.shape
    acc = torch.promote_types(expert_out.dtype, torch.float32)  # fp32, or fp64 for an fp64 reference
    valid = _valid(token_idx, num_tokens).reshape(-1)
    w = gates.to(acc).reshape(E * C, 1) * expert_out.to(acc).reshape(E * C, d)
    y = torch.zeros(num_tokens, d, dtype=acc, device=expert_out.device)
    y.index_add_(0, token_idx.reshape(-1)[valid], w[valid])
    return y.to(expert_out.dtype)


def moe_onehot_masks(token_idx: torch.Tensor, gates: torch.Tensor, num_tokens: int):
    """flaxformer's formulation: dispatch mask [n, E, C] (0/1) and combine
    weights [n, E, C], for ``einsum('nd,nec->ecd')`` / ``einsum('ecd,nec->nd')``."""
    E, C = token_idx.shape
    onehot = torch.nn.functional.one_hot(token_idx.clamp_min(0), num_tokens).to(gates.dtype)  # [E, C, n]
    onehot = onehot * (token_idx >= 0)[..., None]
    dispatch = onehot.permute(2, 0, 1)
    return dispatch, dispatch * gates[None].to(dispatch.dtype)


def moe_segment_sum_ref(src: torch.Tensor, token_idx: torch.Tensor, gates: Optional[torch.Tensor],
                        num_tokens: int) -> torch.Tensor:
    """[n, d]: Σ over each token's slots of gate·src (gates None = 1), in fp32."""
    ones = torch.ones_like(token_idx, dtype=torch.float32)
    return moe_combine_ref(src, token_idx, ones if gates is None else gates, num_tokens)


def moe_combine_bwd_ref(dy: torch.Tensor, expert_out: torch.Tensor, token_idx: torch.Tensor,
                        gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d expert_out [E, C, d], d gates [E, C] fp32) of ``moe_combine_ref``."""
    gathered = moe_dispatch_ref(dy.float(), token_idx)
    dout = (gathered * gates.float()[..., None]).to(expert_out.dtype)
    # Empty slots get 0 whatever expert_out holds there (undefined rows of the grouped path)
    valid = _valid(token_idx, dy.shape[0])
    dgates = torch.where(valid, (gathered * torch.where(valid[..., None], expert_out.float(), 0.0)).sum(-1), 0.0)
    return dout, dgates


# ---------------------------------------------------------------- LoRA on experts
def expert_rows(ends: torch.Tensor, M: int):
    """(expert, first row, end row) of each expert's packed rows."""
    lo = 0
    for e, end in enumerate(ends.clamp(0, M).tolist()):
        hi = max(lo, end)
        yield e, lo, hi
        lo = hi


def _expert_dropped(x: torch.Tensor, lo: int, hi: int, dropout_p: float, seed) -> torch.Tensor:
    """drop(x) on rows lo:hi (the kernels' hash at the packed row, scaled by 1/(1-p))."""
    from ..dropout import dropout_threshold, keep_at
    if dropout_p == 0.0:
        return x[lo:hi]
    rows = torch.arange(lo, hi, device=x.device)[:, None]
    cols = torch.arange(x.shape[1], device=x.device)[None, :]
    keep = keep_at(seed, rows, cols, dropout_threshold(dropout_p))
    return torch.where(keep, x[lo:hi], 0) * (1.0 / (1.0 - dropout_p))


def expert_lora_fwd_ref(x, weight, ends, lora_a, lora_b, ranks, scales, bias, dropout_p, seed):
    """(y, t) as the expert-LoRA forward op: per expert e, y = x_e·W_e + s_e·t_e·B_e[:, :r_e]ᵀ (+ bias_e),
    t_e = drop(x_e)·A_e[:r_e]ᵀ (fp32, zeros past r_e). Rows past ``ends[-1]`` get zeros (the kernel
    leaves them unwritten). fp32 math (fp64 for fp64 inputs); a loop over experts with their row
    counts read on the host (a reference, not a fast path)."""
    M, R = x.shape[0], lora_a.shape[1]
    acc = torch.promote_types(x.dtype, torch.float32)
    y = torch.zeros((M, weight.shape[2]), device=x.device, dtype=acc)
    t = torch.zeros((M, R), device=x.device, dtype=torch.float32 if acc == torch.float32 else acc)
    xf = x.to(acc)
    for e, lo, hi in expert_rows(ends, M):
        r = min(max(int(ranks[e]), 0), R)
        te = _expert_dropped(xf, lo, hi, dropout_p, seed) @ lora_a[e, :r].to(acc).t()
        t[lo:hi, :r] = te.to(t.dtype)
        ye = xf[lo:hi] @ weight[e].to(acc) + float(scales[e]) * (te @ lora_b[e, :, :r].to(acc).t())
        y[lo:hi] = ye if bias is None else ye + bias[e].to(acc)
    return y.to(x.dtype), t


def expert_lora_bwd_ref(dy, x, weight, ends, lora_a, lora_b, ranks, scales, t, dropout_p, seed, needs_dx,
                        needs_dbias):
    """(dx or empty, dA [E, R, K], dB [E, N, R], dbias [E, N] or empty) as the backward op:
    dx_e = dY_e·W_eᵀ + drop'(s_e·dt_e·A_e), dt_e = dY_e·B_e; dA_e = s_e·dt_eᵀ·drop(x_e);
    dB_e = s_e·dY_eᵀ·t_e; dbias_e = Σ dY_e. Rows of dx past ``ends[-1]`` get zeros."""
    from ..dropout import dropout_threshold, keep_at
    M, K = x.shape
    E, R, N = weight.shape[0], lora_a.shape[1], weight.shape[2]
    acc = torch.promote_types(x.dtype, torch.float32)
    gd = torch.float32 if acc == torch.float32 else acc
    dx = torch.zeros((M, K), device=x.device, dtype=acc)
    da = torch.zeros((E, R, K), device=x.device, dtype=gd)
    db = torch.zeros((E, N, R), device=x.device, dtype=gd)
    dbias = torch.zeros((E, N), device=x.device, dtype=gd)
    dyf, xf = dy.to(acc), x.to(acc)
    for e, lo, hi in expert_rows(ends, M):
        r = min(max(int(ranks[e]), 0), R)
        s = float(scales[e])
        dte = dyf[lo:hi] @ lora_b[e, :, :r].to(acc)
        da[e, :r] = (s * dte.t() @ _expert_dropped(xf, lo, hi, dropout_p, seed)).to(gd)
        db[e, :, :r] = (s * dyf[lo:hi].t() @ t[lo:hi, :r].to(acc)).to(gd)
        dbias[e] = dyf[lo:hi].sum(0).to(gd)
        if needs_dx:
            low = s * (dte @ lora_a[e, :r].to(acc))
            if dropout_p > 0.0:
                rows = torch.arange(lo, hi, device=x.device)[:, None]
                cols = torch.arange(K, device=x.device)[None, :]
                low = torch.where(keep_at(seed, rows, cols, dropout_threshold(dropout_p)), low, 0) / (1 - dropout_p)
            dx[lo:hi] = dyf[lo:hi] @ weight[e].to(acc).t() + low
    return (dx.to(x.dtype) if needs_dx else x.new_empty(0), da, db,
            dbias if needs_dbias else x.new_empty(0, dtype=gd))


def expert_lora_mixed_ref(x, weight, ends, lora_a, lora_b, ranks, scales, adapter_ids, bias):
    """The mixed-batch expert LoRA: row j of expert e gets x·W_e (+ bias_e) plus, when
    s = adapter_ids[j] is a slot in [0, S), s_{s,e}·(x·A_{s,e}[:r]ᵀ)·B_{s,e}[:, :r]ᵀ. fp32 math;
    rows past ``ends[-1]`` are zeros."""
    M, S, R = x.shape[0], lora_a.shape[0], lora_a.shape[2]
    acc = torch.promote_types(x.dtype, torch.float32)
    y = torch.zeros((M, weight.shape[2]), device=x.device, dtype=acc)
    xf = x.to(acc)
    for e, lo, hi in expert_rows(ends, M):
        ye = xf[lo:hi] @ weight[e].to(acc)
        if bias is not None:
            ye = ye + bias[e].to(acc)
        ids = adapter_ids[lo:hi]
        for s in ids.unique().tolist():
            if not 0 <= s < S:
                continue
            rows = ids == s
            r = min(max(int(ranks[s, e]), 0), R)
            t = xf[lo:hi][rows] @ lora_a[s, e, :r].to(acc).t()
            ye[rows] += float(scales[s, e]) * (t @ lora_b[s, e, :, :r].to(acc).t())
        y[lo:hi] = ye
    return y.to(x.dtype)
