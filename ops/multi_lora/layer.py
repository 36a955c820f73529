"""``MultiLoRALinear``: an ``nn.Linear`` whose rows each use one of several
LoRA adapters held in slots. It calls the functional API only; no Triton here.
``AdapterPool`` (``ops/adapters/pool.py``) fills its slots from PEFT files."""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import threading
import types
from typing import Optional, Sequence

import torch
from torch import nn

from ..common import MAX_RANK, FrozenLinearWrapper, check, check_rate, is_fp32_number
from ..quant.layer import QuantizedBase, is_quantized_linear
from .function import multi_lora_linear


# ---------------------------------------------------------------- which adapters a forward uses
@dataclasses.dataclass(frozen=True)
class Selection:
    """The adapters of one batch: ``ids`` (a slot per batch row when ``per_row``, else per
    token), and ``rows_repeat`` inside ``generate`` (rows may come in k copies)."""

    ids: torch.Tensor
    per_row: bool
    rows_repeat: bool = False


# group -> Selection of the batch open in this thread / task. A context variable: each thread
# (and asyncio task) sees its own, a new thread starts with none, and leaving a block restores
# the one around it (nesting).
_SELECTED: contextvars.ContextVar = contextvars.ContextVar("posttrain_kernels_selected",
                                                           default=types.MappingProxyType({}))
_OPEN: dict = {}  # group -> {id(selection): selection} of every open batch, all threads
_OPEN_LOCK = threading.Lock()


@contextlib.contextmanager
def selected(group, selection: Selection):
    """The layers of ``group`` use ``selection`` in this context for the duration of the block."""
    token = _SELECTED.set(types.MappingProxyType({**_SELECTED.get(), group: selection}))
    with _OPEN_LOCK:
        _OPEN.setdefault(group, {})[id(selection)] = selection
    try:
        yield selection
    finally:
        with _OPEN_LOCK:
            _OPEN[group].pop(id(selection), None)
        _SELECTED.reset(token)


def current_selection(group) -> Optional[Selection]:
    """This context's selection for ``group``. Inside autograd's backward (which on CUDA runs on
    the engine's own threads, outside the caller's context: activation checkpointing recomputes
    forwards there) the one batch open anywhere for the group; with several open, which one the
    recomputation belongs to is unknown, and that raises rather than guess."""
    sel = _SELECTED.get().get(group)
    if sel is not None or torch._C._current_graph_task_id() == -1:
        return sel
    with _OPEN_LOCK:
        open_ = list(_OPEN.get(group, {}).values())
    if len(open_) > 1:
        raise RuntimeError("adapters: a forward recomputed in backward (activation checkpointing) while several "
                           "batches of this pool are open in other threads: run the backward in the thread of "
                           "its batch (inside the block), or one batch at a time")
    return open_[0] if open_ else None


class MultiLoRALinear(FrozenLinearWrapper):
    """An ``nn.Linear`` whose rows can each use one of ``max_adapters`` LoRA
    adapters (slots), in one forward. Gradients flow to x, and to the slot
    stacks when they are made to require grad (training several adapters in
    one mixed batch); the base weight and bias stay frozen.

    Parameters (frozen by default): ``lora_A [slots, max_rank, in]`` and
    ``lora_B [slots, out, max_rank]`` (the base weight's dtype); buffers
    ``ranks [slots]`` (int32, 0 = empty), ``scales [slots]`` and
    ``lora_dropout [slots]``. ``adapter_ids`` (set by ``AdapterPool.batch``)
    picks the slot of every token, or of every batch row (``ids_per_row``);
    ``None`` runs the base layer. Under autocast the layer computes in the
    autocast dtype and returns it, as ``nn.Linear`` does.

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
    def from_linear(cls, linear: nn.Module, max_adapters: int, max_rank: int,
                    slices: Optional[Sequence[int]] = None) -> "MultiLoRALinear":
        """Wrap ``linear`` (an ``nn.Linear`` or a transformers ``Conv1D``); its
        weight and bias are reused (no copy) and frozen. A quantized linear
        layer (bitsandbytes' ``Linear4bit``, ``QuantLinear``) gives a
        ``QMultiLoRALinear``: many adapters served over one 4-bit base."""
        if is_quantized_linear(linear) and not issubclass(cls, QuantizedBase):
            cls = QMultiLoRALinear
        return super(MultiLoRALinear, cls).from_linear(linear, max_adapters, max_rank, slices)

    def _setup(self, linear, max_adapters, max_rank, slices=None):
        if max_adapters < 1 or not 1 <= max_rank <= MAX_RANK:
            raise ValueError(f"max_adapters / max_rank: expected >= 1 and in [1, {MAX_RANK}], got {max_adapters}, "
                             f"{max_rank}")
        self._adopt(linear)
        if slices is not None and (sum(slices) != self.out_features or min(slices) < 1):
            raise ValueError(f"slices: expected positive widths summing to {self.out_features}, got {list(slices)}")
        self.slices = None if slices is None else [int(w) for w in slices]
        n_sl = 1 if slices is None else len(slices)
        kw = dict(device=self.base_device, dtype=self.base_dtype)
        self.max_rank = max_rank
        rs = (max_adapters,) if slices is None else (n_sl, max_adapters)
        # The slot stacks are Parameters (frozen until ``AdapterPool.trainable_parameters``), so that
        # DDP all-reduces their gradients and FSDP shards them like any trainable weight.
        self.lora_A = nn.Parameter(torch.zeros(max_adapters, n_sl * max_rank, self.in_features, **kw),
                                   requires_grad=False)
        self.lora_B = nn.Parameter(torch.zeros(max_adapters, self.out_features, max_rank, **kw), requires_grad=False)
        self.register_buffer("ranks", torch.zeros(rs, dtype=torch.int32, device=kw["device"]))
        self.register_buffer("scales", torch.zeros(rs, dtype=torch.float32, device=kw["device"]))
        # LoRA dropout per slot, applied in training mode (host copy: decides whether to pass it, no sync)
        self.register_buffer("lora_dropout", torch.zeros(max_adapters, dtype=torch.float32, device=kw["device"]))
        self._dropout: dict[int, float] = {}  # host copy of lora_dropout's nonzero rates (rebuilt on load)
        self.register_load_state_dict_post_hook(_dropout_from_buffer)
        # The adapters of a forward: the open batch of this thread for ``batch_group`` (AdapterPool.batch,
        # ``selected``), else these attributes, for a layer used on its own.
        self.batch_group = None
        self.adapter_ids: Optional[torch.Tensor] = None
        self.ids_per_row = False  # adapter_ids holds one id per batch row
        self.rows_repeat = False  # a batch may hold k copies of each row (beams, sequences)

    @torch.no_grad()
    def set_slot(self, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                 slice_index: Optional[int] = None, dropout: float = 0.0) -> None:
        """Write one adapter (``lora_a [r, in]``, ``lora_b [out or slice width, r]``)
        into ``slot`` (of slice ``slice_index`` for a fused projection), with
        its LoRA dropout rate (the slot's, shared by its slices). Every
        argument is checked first (``check_slot``): a failure leaves the slot
        as it was."""
        r = self.check_slot(slot, lora_a, lora_b, scale, slice_index, dropout)
        self._write_slot(slot, lora_a, lora_b, r, scale, slice_index, dropout)

    def check_slot(self, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                   slice_index: Optional[int] = None, dropout: float = 0.0) -> int:
        """``ValueError`` naming the argument unless ``set_slot`` with these arguments would
        succeed; returns the rank. Callers that write several layers check them all first."""
        slots = self.lora_A.shape[0]
        check(isinstance(slot, int) and 0 <= slot < slots, "slot", f"expected an int in [0, {slots}), got {slot!r}")
        if self.slices is None:
            check(slice_index is None, "slice_index", "only for a layer with slices")
            width = self.out_features
        else:
            check(isinstance(slice_index, int) and 0 <= slice_index < len(self.slices), "slice_index",
                  f"expected an int in [0, {len(self.slices)}) for a layer with slices {self.slices}, "
                  f"got {slice_index!r}")
            width = self.slices[slice_index]
        for name, v in (("lora_a", lora_a), ("lora_b", lora_b)):
            check(isinstance(v, torch.Tensor) and v.dim() == 2 and v.is_floating_point(), name,
                  f"expected a floating 2-D tensor, got {getattr(v, 'dtype', type(v).__name__)} "
                  f"{tuple(getattr(v, 'shape', ()))}")
            check(v.device.type != "meta", name, "is on the meta device: it has no values to copy")
        r = lora_a.shape[0]
        check(1 <= r <= self.max_rank and lora_a.shape[1] == self.in_features, "lora_a",
              f"expected [r, {self.in_features}] with 1 <= r <= max_rank={self.max_rank}, got {tuple(lora_a.shape)}")
        check(tuple(lora_b.shape) == (width, r), "lora_b", f"expected [{width}, {r}], got {tuple(lora_b.shape)}")
        check(is_fp32_number(scale), "scale", f"expected a float finite in fp32, got {scale!r}")
        check_rate(dropout, "dropout")
        return r

    def _write_slot(self, slot, lora_a, lora_b, r, scale, slice_index, dropout) -> None:
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

    def token_ids(self, x: torch.Tensor, selection: Optional[Selection] = None) -> torch.Tensor:
        """One slot id per token of ``x`` from ``adapter_ids``. Per-row ids
        (``AdapterPool.batch`` with names) must match the batch dim, except
        inside ``generate`` (``rows_repeat``): a batch of k times as many rows,
        as ``num_beams`` or ``num_return_sequences`` > 1 make
        (``repeat_interleave`` of the inputs), repeats each id k times, as
        PEFT expands ``adapter_names``. Per-token ids (a tensor) must have one
        id per token, or one per batch row."""
        sel = selection or Selection(self.adapter_ids, self.ids_per_row, self.rows_repeat)
        ids, tokens = sel.ids, x.shape[:-1]
        rows = tokens[0] if len(tokens) else 1
        if sel.per_row:
            n = ids.numel()
            fits = rows == n or (sel.rows_repeat and n >= 1 and rows % n == 0)
            check(fits, "adapters", f"{n} adapter names for a batch of {rows} rows: give one name per batch row")
            ids = ids.repeat_interleave(rows // n) if rows != n else ids
        elif not (ids.dim() == 1 and len(tokens) >= 2 and ids.numel() == rows):
            return ids.reshape(-1)  # one id per token; multi_lora_linear checks the count
        return ids.reshape(rows, *([1] * (len(tokens) - 1))).expand(*tokens).reshape(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sel = None if self.batch_group is None else current_selection(self.batch_group)
        if sel is None and self.adapter_ids is None:
            return self._base_forward(x)
        ids = self.token_ids(x, sel)
        drop = self.lora_dropout if self.training and any(p > 0 for p in self._dropout.values()) else None
        return multi_lora_linear(x, self.weight_nk, self.lora_A, self.lora_B, self.ranks, self.scales, ids,
                                 self.bias, self.slices, drop)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"slots={self.lora_A.shape[0]}, max_rank={self.max_rank}, slices={self.slices}")


class QMultiLoRALinear(QuantizedBase, MultiLoRALinear):
    """``MultiLoRALinear`` over a quantized frozen base (bitsandbytes' ``Linear4bit``, ``QuantLinear``),
    kept as ``base_layer``: serving many adapters over one 4-bit model. The slot stacks take the
    base's compute dtype; the forward computes in it, the 4-bit weight decoded inside the kernels.
    Made by ``MultiLoRALinear.from_linear`` (and so by ``AdapterPool``) for such a base."""


def _dropout_from_buffer(module: MultiLoRALinear, incompatible_keys):
    """After ``load_state_dict``: the host copy of the per-slot dropout rates from the loaded buffer."""
    module._dropout = {i: p for i, p in enumerate(module.lora_dropout.tolist()) if p > 0}
