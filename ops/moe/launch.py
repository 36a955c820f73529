"""MoE token-movement launchers: the only code of the feature that touches Triton.

``moe_dispatch_triton`` / ``moe_segment_sum_triton`` / ``moe_combine_bwd_triton``
have the signatures of the references in ``reference.py``; the ops
(``op.py``) call one or the other.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...autotune.cache import select_config
from ...autotune.moe import MOE_GATHER, MOE_SEGMENT_SUM
from ..backend import device_info, on_device
from ..common import cdiv, dtype_name


def inverse_index(token_idx: Tensor, num_tokens: int):
    """(order, offsets): slot ids sorted by the token they hold (stable, so by
    slot id within a token; empty slots last) and ``offsets [n + 1]``, token
    t's slots being ``order[offsets[t]:offsets[t + 1]]``. On device, no sync."""
    flat = token_idx.reshape(-1)
    key = torch.where(flat < 0, torch.full_like(flat, num_tokens), flat)
    sorted_key, order = torch.sort(key, stable=True)
    bounds = torch.arange(num_tokens + 1, device=flat.device, dtype=sorted_key.dtype)
    offsets = torch.searchsorted(sorted_key, bounds)
    return order, offsets


def moe_gather(src: Tensor, idx: Tensor, scale: Optional[Tensor] = None, other: Optional[Tensor] = None,
               out_dtype: Optional[torch.dtype] = None):
    """(out [S, D], dot [S] fp32 or None): out[s] = scale[s]·src[idx[s]] (0 where idx < 0);
    dot[s] = <src[idx[s]], other[s]> when ``other`` is given."""
    S, D = idx.numel(), src.shape[1]
    out = torch.empty((S, D), device=src.device, dtype=out_dtype or src.dtype)
    dot = torch.empty((S,), device=src.device, dtype=torch.float32) if other is not None else None
    if S == 0:
        return out, dot
    cfg = select_config(MOE_GATHER, dtype_name(src.dtype), device_info(src.device), D=D)
    MOE_GATHER.fn[(cdiv(S, cfg["BLOCK_S"]),)](
        src_ptr=src, idx_ptr=idx, scale_ptr=scale if scale is not None else out,
        other_ptr=other if other is not None else out, out_ptr=out, dot_ptr=dot if dot is not None else out,
        n=src.shape[0], S=S, D=D, stride_src=src.stride(0),
        stride_other=other.stride(0) if other is not None else 0,
        stride_out=out.stride(0), HAS_SCALE=scale is not None, HAS_DOT=other is not None,
        **MOE_GATHER.launch_kwargs(cfg))
    return out, dot


def moe_segment_sum(src: Tensor, order: Tensor, offsets: Tensor, gates: Optional[Tensor], num_tokens: int,
                    out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """out [n, D]: out[t] = Σ gate·src over token t's slots, fp32, in ``order``."""
    D = src.shape[1]
    out = torch.empty((num_tokens, D), device=src.device, dtype=out_dtype or src.dtype)
    if num_tokens == 0:
        return out
    cfg = select_config(MOE_SEGMENT_SUM, dtype_name(src.dtype), device_info(src.device), D=D)
    MOE_SEGMENT_SUM.fn[(num_tokens, cdiv(D, cfg["BLOCK_D"]))](
        src_ptr=src, order_ptr=order, offsets_ptr=offsets, gate_ptr=gates if gates is not None else src,
        out_ptr=out, n=num_tokens, D=D, stride_src=src.stride(0), stride_out=out.stride(0),
        HAS_GATES=gates is not None, **MOE_SEGMENT_SUM.launch_kwargs(cfg))
    return out


def _rows(t: Tensor) -> Tensor:
    """2-D view with a contiguous last dim (what the kernels index)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


@on_device
def moe_dispatch_triton(x: Tensor, token_idx: Tensor) -> Tensor:
    """[E, C, d]: x[token_idx], zero rows for empty slots."""
    E, C = token_idx.shape
    if x.shape[-1] == 0:
        return x.new_zeros((E, C, 0))
    out, _ = moe_gather(_rows(x), token_idx.reshape(-1).contiguous())
    return out.reshape(E, C, x.shape[-1])


@on_device
def moe_segment_sum_triton(src: Tensor, token_idx: Tensor, gates: Optional[Tensor], num_tokens: int) -> Tensor:
    """[n, d]: Σ over each token's slots of gate·src (gates None = 1); src [E, C, d]."""
    if src.shape[-1] == 0:
        return src.new_zeros((num_tokens, 0))
    order, offsets = inverse_index(token_idx, num_tokens)
    return moe_segment_sum(_rows(src), order, offsets, None if gates is None else gates.reshape(-1).contiguous(),
                           num_tokens)


@on_device
def moe_combine_bwd_triton(dy: Tensor, expert_out: Tensor, token_idx: Tensor, gates: Tensor) -> tuple[Tensor, Tensor]:
    """(d expert_out [E, C, d], d gates [E, C] fp32) in one gather pass."""
    E, C, d = expert_out.shape
    if d == 0:
        return expert_out.new_zeros(expert_out.shape), gates.new_zeros(gates.shape, dtype=torch.float32)
    # The kernels index the slot table and the gates at unit stride: a strided view is copied.
    dout, dgates = moe_gather(_rows(dy), token_idx.reshape(-1).contiguous(), gates.reshape(-1).float().contiguous(),
                              _rows(expert_out),
                              out_dtype=expert_out.dtype)
    return dout.reshape(E, C, d), dgates.reshape(E, C)
