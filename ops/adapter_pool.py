"""Multi-tenant LoRA serving: ``MultiLoRALinear`` and ``AdapterPool``.

A pool swaps the targeted ``nn.Linear`` modules of any model for
``MultiLoRALinear`` layers that hold ``max_adapters`` adapter slots each.
``pool.load(name, path)`` reads a PEFT adapter directory into a free slot of
every targeted layer; ``with pool.batch(names): model(...)`` runs one forward
in which each batch row uses its own adapter (``None``: the base model).
No Triton here: the layers call ``multi_lora_linear``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

from .adapters import _matches, _set_submodule, read_adapter
from .multi_lora import multi_lora_linear


class MultiLoRALinear(nn.Module):
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
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(base, max_adapters, max_rank, slices)

    @classmethod
    def from_linear(cls, linear: nn.Linear, max_adapters: int, max_rank: int,
                    slices: Optional[Sequence[int]] = None) -> "MultiLoRALinear":
        """Wrap ``linear``; its weight and bias are reused (no copy) and frozen."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(linear, max_adapters, max_rank, slices)
        return self

    def _setup(self, linear, max_adapters, max_rank, slices=None):
        if max_adapters < 1 or not 1 <= max_rank <= 256:
            raise ValueError(f"max_adapters / max_rank: expected >= 1 and in [1, 256], got {max_adapters}, {max_rank}")
        if slices is not None and (sum(slices) != linear.out_features or min(slices) < 1):
            raise ValueError(f"slices: expected positive widths summing to {linear.out_features}, got {list(slices)}")
        self.slices = None if slices is None else [int(w) for w in slices]
        n_sl = 1 if slices is None else len(slices)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        kw = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        self.max_rank = max_rank
        rs = (max_adapters,) if slices is None else (n_sl, max_adapters)
        self.register_buffer("lora_A", torch.zeros(max_adapters, n_sl * max_rank, self.in_features, **kw))
        self.register_buffer("lora_B", torch.zeros(max_adapters, self.out_features, max_rank, **kw))
        self.register_buffer("ranks", torch.zeros(rs, dtype=torch.int32, device=kw["device"]))
        self.register_buffer("scales", torch.zeros(rs, dtype=torch.float32, device=kw["device"]))
        self.adapter_ids: Optional[torch.Tensor] = None

    @torch.no_grad()
    def set_slot(self, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                 slice_index: Optional[int] = None) -> None:
        """Write one adapter (``lora_a [r, in]``, ``lora_b [out or slice width, r]``)
        into ``slot`` (of slice ``slice_index`` for a fused projection)."""
        r = lora_a.shape[0]
        if r > self.max_rank:
            raise ValueError(f"lora_a: rank {r} exceeds max_rank={self.max_rank}")
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.adapter_ids
        if ids is None:
            return nn.functional.linear(x, self.weight, self.bias)
        tokens = x.shape[:-1]
        if ids.dim() == 1 and len(tokens) >= 2 and ids.numel() == tokens[0]:
            ids = ids[:, None].expand(*tokens)  # one id per batch row
        return multi_lora_linear(x, self.weight, self.lora_A, self.lora_B, self.ranks, self.scales,
                                 ids.reshape(-1), self.bias, self.slices)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"slots={self.lora_A.shape[0]}, max_rank={self.max_rank}, slices={self.slices}")


class AdapterPool:
    """Load and unload PEFT LoRA adapters into a running model, and serve mixed batches.

    ``AdapterPool(model, target_modules=["q_proj", "v_proj"], max_adapters=8, max_rank=16)``
    swaps every matching ``nn.Linear`` for a ``MultiLoRALinear`` (PEFT's
    matching rule: a list entry matches a name or its last components; a
    string is a full-match regex).
    """

    def __init__(self, model: nn.Module, target_modules: Union[str, Iterable[str]], max_adapters: int = 8,
                 max_rank: int = 16):
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, target_modules)]
        if not names:
            raise ValueError(f"target_modules: no nn.Linear of the model matches {target_modules!r}")
        self.model, self.max_adapters, self.max_rank = model, max_adapters, max_rank
        self.layers: dict[str, MultiLoRALinear] = {}
        for n in names:
            layer = MultiLoRALinear.from_linear(model.get_submodule(n), max_adapters, max_rank)
            _set_submodule(model, n, layer)
            self.layers[n] = layer
        self.slots: dict[str, int] = {}  # adapter name -> slot
        self._last_used: dict[str, int] = {}
        self._clock = 0

    @property
    def names(self) -> list[str]:
        return list(self.slots)

    def slot(self, name: str) -> int:
        if name not in self.slots:
            raise KeyError(f"adapter {name!r} is not loaded (loaded: {self.names})")
        return self.slots[name]

    def load(self, name: str, path, evict: bool = False) -> int:
        """Read a PEFT adapter directory into a free slot and return the slot.

        Everything is checked first (files, keys, shapes, rank ≤ max_rank,
        every targeted module present in the pool); a bad adapter raises
        ``ValueError`` and leaves the pool exactly as it was. A full pool
        raises, or with ``evict=True`` unloads the least recently used adapter.
        """
        if name in self.slots:
            raise ValueError(f"name: adapter {name!r} is already loaded in slot {self.slots[name]}")
        config, tensors = read_adapter(path)
        plan = []
        for module, pair in tensors.items():
            if module not in self.layers:
                raise ValueError(f"path: the adapter targets {module}, which is not a layer of this pool "
                                 f"(pool layers: {len(self.layers)}, e.g. {next(iter(self.layers))})")
            layer = self.layers[module]
            A, B = pair["A"], pair["B"]
            r = A.shape[0]
            if A.dim() != 2 or B.dim() != 2 or A.shape[1] != layer.in_features or tuple(B.shape) != (
                    layer.out_features, r):
                raise ValueError(f"path: {module}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit a "
                                 f"[{layer.out_features}, {layer.in_features}] linear")
            if r > self.max_rank:
                raise ValueError(f"path: {module}: rank {r} exceeds the pool's max_rank={self.max_rank}")
            alpha = config.get("alpha_pattern", {}).get(module.split(".")[-1], config["lora_alpha"])
            scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
            plan.append((layer, A, B, scale))
        free = [s for s in range(self.max_adapters) if s not in self.slots.values()]
        if not free:
            if not evict:
                raise RuntimeError(f"adapter pool is full ({self.max_adapters} adapters: {self.names}); unload one "
                                   f"or load with evict=True")
            lru = min(self._last_used, key=self._last_used.get)
            free = [self.slots[lru]]
            self.unload(lru)
        slot = free[0]
        for layer in self.layers.values():  # layers the adapter does not cover get an empty slot
            layer.clear_slot(slot)
        for layer, A, B, scale in plan:
            layer.set_slot(slot, A.to(layer.lora_A.dtype), B.to(layer.lora_B.dtype), scale)
        self.slots[name] = slot
        self._touch(name)
        return slot

    def unload(self, name: str) -> None:
        slot = self.slot(name)
        for layer in self.layers.values():
            layer.clear_slot(slot)
        del self.slots[name]
        self._last_used.pop(name, None)

    def _touch(self, name: str) -> None:
        self._clock += 1
        self._last_used[name] = self._clock

    def ids(self, names: Sequence[Optional[str]], device=None) -> torch.Tensor:
        """Slot ids for a list of adapter names (``None``: the base model)."""
        for n in names:
            if n is not None:
                self.slot(n)
                self._touch(n)
        device = device or next(iter(self.layers.values())).weight.device
        return torch.tensor([-1 if n is None else self.slots[n] for n in names], dtype=torch.int64, device=device)

    @contextlib.contextmanager
    def batch(self, adapters: Union[Sequence[Optional[str]], torch.Tensor]):
        """Select adapters for the forwards inside the block: a list of names,
        one per batch row (``None``: base model), or a tensor of slot ids, one
        per token (packed / ragged batches; -1: base model)."""
        ids = adapters if isinstance(adapters, torch.Tensor) else self.ids(adapters)
        for layer in self.layers.values():
            layer.adapter_ids = ids
        try:
            yield ids
        finally:
            for layer in self.layers.values():
                layer.adapter_ids = None
