"""``MultiLoRALinear``: an ``nn.Linear`` whose rows each use one of several
LoRA adapters held in slots. It calls the functional API only; no Triton here.
``AdapterPool`` (``ops/adapters/pool.py``) fills its slots from PEFT files."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..common import MAX_RANK, FrozenLinearWrapper
from .function import multi_lora_linear


class MultiLoRALinear(FrozenLinearWrapper):
    """An ``nn.Linear`` whose rows can each use one of ``max_adapters`` LoRA
    adapters (slots), in one forward. Gradients flow to x, and to the slot
    buffers when they are made to require grad (training several adapters in
    one mixed batch); the base weight and bias stay frozen.

    Buffers: ``lora_A [slots, max_rank, in]``, ``lora_B [slots, out, max_rank]``
    (the base weight's dtype), ``ranks [slots]`` (int32, 0 = empty) and
    ``scales [slots]``. ``adapter_ids`` (set by ``AdapterPool.batch``) picks the
    slot of every token, or of every batch row; ``None`` runs the base layer.

    ``slices``: output widths of a fused projection (q/k/v in one Linear, e.g.
    ``[4096, 1024, 1024]``), each slice with its own adapter per slot:
    ``lora_A`` is then ``[slots, len(slices)·max_rank, in]`` and ``ranks`` /
    ``scales`` ``[len(slices), slots]``; one launch serves every slice.
    """

    def __init__(self, in_features: int, out_features: int, max_adapters: int, max_rank: int, bias: bool = True,
                 slices: Optional[Sequence[int]] = None, device=None, dtype=None):
        super().__init__()
        self._setup(nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype), max_adapters,
                    max_rank, slices)

    @classmethod
    def from_linear(cls, linear: nn.Linear, max_adapters: int, max_rank: int,
                    slices: Optional[Sequence[int]] = None) -> "MultiLoRALinear":
        """Wrap ``linear``; its weight and bias are reused (no copy) and frozen."""
        return super().from_linear(linear, max_adapters, max_rank, slices)

    def _setup(self, linear, max_adapters, max_rank, slices=None):
        if max_adapters < 1 or not 1 <= max_rank <= MAX_RANK:
            raise ValueError(f"max_adapters / max_rank: expected >= 1 and in [1, {MAX_RANK}], got {max_adapters}, "
                             f"{max_rank}")
        if slices is not None and (sum(slices) != linear.out_features or min(slices) < 1):
            raise ValueError(f"slices: expected positive widths summing to {linear.out_features}, got {list(slices)}")
        self.slices = None if slices is None else [int(w) for w in slices]
        n_sl = 1 if slices is None else len(slices)
        self._adopt(linear)
        kw = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        self.max_rank = max_rank
        rs = (max_adapters,) if slices is None else (n_sl, max_adapters)
        self.register_buffer("lora_A", torch.zeros(max_adapters, n_sl * max_rank, self.in_features, **kw))
        self.register_buffer("lora_B", torch.zeros(max_adapters, self.out_features, max_rank, **kw))
        self.register_buffer("ranks", torch.zeros(rs, dtype=torch.int32, device=kw["device"]))
        self.register_buffer("scales", torch.zeros(rs, dtype=torch.float32, device=kw["device"]))
        # LoRA dropout per slot, applied in training mode (host copy: decides whether to pass it, no sync)
        self.register_buffer("lora_dropout", torch.zeros(max_adapters, dtype=torch.float32, device=kw["device"]))
        self._dropout: dict[int, float] = {}
        self.adapter_ids: Optional[torch.Tensor] = None

    @torch.no_grad()
    def set_slot(self, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                 slice_index: Optional[int] = None, dropout: float = 0.0) -> None:
        """Write one adapter (``lora_a [r, in]``, ``lora_b [out or slice width, r]``)
        into ``slot`` (of slice ``slice_index`` for a fused projection), with
        its LoRA dropout rate (the slot's, shared by its slices)."""
        r = lora_a.shape[0]
        if r > self.max_rank:
            raise ValueError(f"lora_a: rank {r} exceeds max_rank={self.max_rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a rate in [0, 1), got {dropout!r}")
        self.lora_dropout[slot] = dropout
        self._dropout[slot] = float(dropout)
        if self.slices is None:
            self.lora_A[slot].zero_()
            self.lora_B[slot].zero_()
            self.lora_A[slot, :r] = lora_a
            self.lora_B[slot, :, :r] = lora_b
            self.ranks[slot] = r
            self.scales[slot] = scale
            return
        i = slice_index
        lo = sum(self.slices[:i])
        R = self.max_rank
        self.lora_A[slot, i * R:(i + 1) * R].zero_()
        self.lora_B[slot, lo:lo + self.slices[i]].zero_()
        self.lora_A[slot, i * R:i * R + r] = lora_a
        self.lora_B[slot, lo:lo + self.slices[i], :r] = lora_b
        self.ranks[i, slot] = r
        self.scales[i, slot] = scale

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.ranks[..., slot] = 0
        self.scales[..., slot] = 0.0
        self.lora_dropout[slot] = 0.0
        self._dropout.pop(slot, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.adapter_ids
        if ids is None:
            return nn.functional.linear(x, self.weight, self.bias)
        tokens = x.shape[:-1]
        if ids.dim() == 1 and len(tokens) >= 2 and ids.numel() == tokens[0]:
            ids = ids[:, None].expand(*tokens)  # one id per batch row
        drop = self.lora_dropout if self.training and any(p > 0 for p in self._dropout.values()) else None
        return multi_lora_linear(x, self.weight, self.lora_A, self.lora_B, self.ranks, self.scales,
                                 ids.reshape(-1), self.bias, self.slices, drop)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"slots={self.lora_A.shape[0]}, max_rank={self.max_rank}, slices={self.slices}")
