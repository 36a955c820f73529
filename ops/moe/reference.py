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
