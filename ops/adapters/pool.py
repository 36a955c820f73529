"""Multi-tenant LoRA serving and training: ``AdapterPool``.

A pool swaps the targeted ``nn.Linear`` modules of any model for
``MultiLoRALinear`` layers that hold ``max_adapters`` adapter slots each.
``pool.load(name, path)`` reads a PEFT adapter directory into a free slot of
every targeted layer; ``with pool.batch(names): model(...)`` runs one forward
in which each batch row uses its own adapter (``None``: the base model).
``pool.add`` / ``trainable_parameters`` / ``save`` train several new adapters
in one mixed batch and write each in PEFT's format.
No Triton here: the layers call ``multi_lora_linear``.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import threading
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

from ..common import (check, check_rate, check_values, is_fp32_number, is_number, lora_alpha_of, lora_scale,
                      set_submodule)
from ..lora.layer import check_init, init_lora_
from ..multi_lora.layer import MultiLoRALinear, Selection, current_selection, selected
from .format import read_adapter, validate_adapter, write_adapter
from .model import resolve_targets, target_list


class AdapterPool:
    """Load and unload PEFT LoRA adapters into a running model, and serve mixed batches.

    ``AdapterPool(model, target_modules=["q_proj", "v_proj"], max_adapters=8, max_rank=16)``
    swaps every matching linear layer (``nn.Linear``, GPT-2's ``Conv1D``) for
    a ``MultiLoRALinear`` (PEFT's matching rules: a list entry matches a name
    or its last components, a string is a full-match regex, ``"all-linear"``
    is every linear layer but the output layer).

    Concurrency (docs/reliability.md): a ``batch`` belongs to the thread (or
    asyncio task) that opens it and nests, so threads serving different
    batches never see each other's adapters; the slots a batch names are in
    use until it ends (``unload`` refuses them, eviction passes them over),
    so no forward sees its adapter change under it; ``load`` / ``add`` write
    a free slot, which no batch names, and publish the name only when every
    layer is written. Changes to the pool are serialised by a lock.
    """

    def __init__(self, model: nn.Module, target_modules: Union[str, Iterable[str]], max_adapters: int = 8,
                 max_rank: int = 16):
        names = resolve_targets(model, target_modules)
        if not names:
            raise ValueError(f"target_modules: no linear layer of the model matches {target_modules!r}")
        self.model, self.max_adapters, self.max_rank = model, max_adapters, max_rank
        self.layers: dict[str, MultiLoRALinear] = {}
        for n in names:
            layer = MultiLoRALinear.from_linear(model.get_submodule(n), max_adapters, max_rank)
            set_submodule(model, n, layer)
            self.layers[n] = layer
        self.slots: dict[str, int] = {}  # adapter name -> slot
        self._rslora: dict[str, bool] = {}  # adapter name -> rsLoRA scaling (for save)
        self._last_used: dict[str, int] = {}
        self._clock = 0
        self._lock = threading.RLock()  # slot table, in-use counts and the generate wrapper
        self._in_use: collections.Counter = collections.Counter()  # slot -> open batches naming it
        self._generate_users = 0  # open name batches (the generate wrapper is installed while > 0)
        self._unwrap_generate = None
        self._group = next(_GROUPS)  # the layers' batch group: which open batch a forward uses
        for layer in self.layers.values():
            layer.batch_group = self._group

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
        alphas finite in fp32, every targeted module present in the pool); a
        bad adapter raises ``ValueError`` and leaves the pool exactly as it
        was (eviction included: it happens only once the adapter is known to
        fit). A full pool raises, or with ``evict=True`` unloads the least
        recently used adapter that no open batch uses.
        """
        check(isinstance(name, str), "name", f"expected an adapter name (str; None is the base model), got {name!r}")
        config, tensors = read_adapter(path)
        shapes = {n: (layer.in_features, layer.out_features) for n, layer in self.layers.items()}
        missing = (f"which is not a layer of this pool (pool layers: {len(self.layers)}, e.g. "
                   f"{next(iter(self.layers))})")
        entries, dropout = validate_adapter(config, tensors, shapes, missing, self.max_rank)
        plan = [(self.layers[e.name], e.A, e.B, e.scale) for e in entries]
        for layer, A, B, scale in plan:  # every layer's write checked before the first change
            layer.check_slot(0, A, B, scale, dropout=dropout)
        with self._lock:
            self._check_new_name(name)
            slot = self._free_slot(evict)
            for layer in self.layers.values():  # layers the adapter does not cover get an empty slot
                layer.clear_slot(slot)
            for layer, A, B, scale in plan:
                layer.set_slot(slot, A.to(layer.lora_A.dtype), B.to(layer.lora_B.dtype), scale, dropout=dropout)
            self._publish(name, slot, bool(config.get("use_rslora")))
        return slot

    def _check_new_name(self, name: str) -> None:
        if name in self.slots:
            raise ValueError(f"name: adapter {name!r} is already loaded in slot {self.slots[name]}")

    def _publish(self, name: str, slot: int, rslora: bool) -> None:
        """Make a written slot visible to ``batch`` under ``name``. On CUDA the writes were queued on
        this thread's stream: they complete first, so a forward on another stream never reads a
        half-written slot."""
        device = next(iter(self.layers.values())).lora_A.device
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        self.slots[name] = slot
        self._rslora[name] = rslora
        self._touch(name)

    def _free_slot(self, evict: bool) -> int:
        free = [s for s in range(self.max_adapters) if s not in self.slots.values()]
        if free:
            return free[0]
        if not evict:
            raise RuntimeError(f"adapter pool is full ({self.max_adapters} adapters: {self.names}); unload one "
                               f"or pass evict=True")
        idle = [n for n in self._last_used if not self._in_use[self.slots[n]]]
        if not idle:
            raise RuntimeError(f"adapter pool is full and every adapter is in use by an open batch "
                               f"({self.names}): nothing to evict")
        lru = min(idle, key=self._last_used.get)
        slot = self.slots[lru]
        self.unload(lru)
        return slot

    def add(self, name: str, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0, use_rslora: bool = False,
            init_lora_weights: Union[bool, str] = "kaiming", evict: bool = False) -> int:
        """A new adapter of rank ``r`` on every layer of the pool, initialised
        as PEFT does (``init_lora_weights`` as in ``LoRALinear``), in a free
        slot; returns the slot. ``lora_dropout`` applies to this adapter's
        rows while the model is in training mode. For training several
        adapters in one mixed batch: see ``trainable_parameters``, then ``save``."""
        check(isinstance(name, str), "name", f"expected an adapter name (str; None is the base model), got {name!r}")
        if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= self.max_rank:
            raise ValueError(f"r: expected an int in [1, max_rank={self.max_rank}], got {r!r}")
        check_rate(lora_dropout, "lora_dropout")
        check(is_number(lora_alpha), "lora_alpha", f"expected a finite number, got {lora_alpha!r}")
        check_init(init_lora_weights)
        scale = lora_scale(lora_alpha, r, use_rslora)
        check(is_fp32_number(scale), "lora_alpha", f"the scale it gives must be finite in fp32, got {scale!r}")
        # Every layer's adapter made and checked before the first change (eviction included).
        plan = []
        for layer in self.layers.values():
            a = torch.empty(r, layer.in_features, device=layer.lora_A.device, dtype=torch.float32)
            b = torch.empty(layer.out_features, r, device=layer.lora_B.device, dtype=torch.float32)
            init_lora_(a, b, init_lora_weights)
            layer.check_slot(0, a, b, scale, dropout=float(lora_dropout))
            plan.append((layer, a, b))
        with self._lock:
            self._check_new_name(name)
            slot = self._free_slot(evict)
            for layer, a, b in plan:
                layer.set_slot(slot, a, b, scale, dropout=float(lora_dropout))
            self._publish(name, slot, use_rslora)
        return slot

    def trainable_parameters(self) -> list[torch.Tensor]:
        """The slot stacks (``lora_A``, ``lora_B`` of every layer), made to
        require grad, for an optimizer: one mixed batch trains every adapter
        it uses. The stacks hold every slot, so slots absent from a batch get
        zero gradients; an optimizer with decoupled weight decay (AdamW)
        would still shrink them, so train with ``weight_decay=0`` or with only
        the adapters being trained loaded. Rank padding gets zero gradients
        and stays zero. Reset the optimizer's state when slots change hands.

        Every other parameter of the model is frozen, as PEFT does, so that
        DDP / FSDP train (and all-reduce) the adapters alone; the stacks are
        ``nn.Parameter`` s, which DDP all-reduces and FSDP shards."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        out = []
        for layer in self.layers.values():
            layer.lora_A.requires_grad_(True)
            layer.lora_B.requires_grad_(True)
            out += [layer.lora_A, layer.lora_B]
        return out

    @torch.no_grad()
    def save(self, name: str, path, base_model_name_or_path: Optional[str] = None) -> None:
        """Write adapter ``name`` as PEFT's ``save_pretrained`` does, so that
        ``peft.PeftModel.from_pretrained`` (or ``pool.load``) reads it back:
        the layers it covers (rank > 0), with ``rank_pattern`` /
        ``alpha_pattern`` for layers whose rank or alpha differ from the first."""
        slot = self.slot(name)
        if self.layers[next(iter(self.layers))].slices is not None:
            raise ValueError("save: fused-slice layers have no PEFT layout")
        rslora = self._rslora.get(name, False)
        tensors, ranks, alphas = {}, {}, {}
        for n, layer in self.layers.items():
            r = int(layer.ranks[slot])
            if r == 0:
                continue
            alpha = lora_alpha_of(float(layer.scales[slot]), r, rslora)
            ranks[n], alphas[n] = r, int(round(alpha)) if abs(alpha - round(alpha)) < 1e-4 else alpha
            tensors[n] = (layer.lora_A[slot, :r], layer.lora_B[slot, :, :r])
        if not tensors:
            raise ValueError(f"name: adapter {name!r} covers no layer")
        first = next(iter(tensors))
        write_adapter(path, tensors, ranks[first], alphas[first], target_list(self.model, tensors),
                      lora_dropout=round(float(self.layers[first].lora_dropout[slot]), 6), use_rslora=rslora,
                      rank_pattern={n: r for n, r in ranks.items() if r != ranks[first]},
                      alpha_pattern={n: a for n, a in alphas.items() if a != alphas[first]},
                      base_model_name_or_path=base_model_name_or_path,
                      fan_in_fan_out=any(self.layers[n].fan_in_fan_out for n in tensors))

    def unload(self, name: str) -> None:
        """Free the adapter's slot in every layer (its rank becomes 0). An adapter that an open
        batch uses (in any thread) is refused with ``RuntimeError``: its rows would silently get
        the base model, or the next adapter loaded into the slot."""
        with self._lock:
            slot = self.slot(name)
            if self._in_use[slot]:
                raise RuntimeError(f"name: adapter {name!r} is in use by {self._in_use[slot]} open batch(es); "
                                   f"unload it after they end")
            del self.slots[name]  # unpublished first: no new batch can name it
            self._rslora.pop(name, None)
            self._last_used.pop(name, None)
            for layer in self.layers.values():
                layer.clear_slot(slot)

    def _touch(self, name: str) -> None:
        self._clock += 1
        self._last_used[name] = self._clock

    def ids(self, names: Sequence[Optional[str]], device=None) -> torch.Tensor:
        """Slot ids for a list of adapter names (``None``: the base model)."""
        check(isinstance(names, (list, tuple)) and len(names) >= 1, "adapters",
              f"expected a non-empty list of adapter names (None = base model), got {names!r:.80}")
        with self._lock:
            for n in names:
                if n is not None:
                    check(n in self.slots, "adapters", f"adapter {n!r} is not loaded (loaded: {self.names})")
                    self._touch(n)
            slots = [-1 if n is None else self.slots[n] for n in names]
        device = device or next(iter(self.layers.values())).base_device
        return torch.tensor(slots, dtype=torch.int64, device=device)

    @contextlib.contextmanager
    def batch(self, adapters: Union[Sequence[Optional[str]], torch.Tensor]):
        """Select adapters for the forwards inside the block: a list of names,
        one per batch row (``None``: base model), or a tensor of slot ids, one
        per token (packed / ragged batches; -1: base model).

        The selection is this thread's (or asyncio task's) and nests: other
        threads' forwards do not see it, and leaving an inner block restores
        the outer one. Until the block ends, the adapters it names (with a
        tensor of slot ids: every loaded adapter, since any slot may be named)
        cannot be unloaded or evicted.

        Names must match the batch: one per row, or, inside
        ``model.generate`` with ``num_beams`` or ``num_return_sequences`` > 1
        (which repeat each row k times), each name stands for its row's k
        copies, as PEFT's ``generate(adapter_names=...)`` does. Anything else
        raises ``ValueError`` naming ``adapters`` at the forward: a count that
        does not fit is never spread over rows silently (a tenant's rows must
        not run another tenant's adapter)."""
        per_row = not isinstance(adapters, torch.Tensor)
        with self._lock:
            if per_row:
                ids = self.ids(adapters)
                used = {self.slots[n] for n in adapters if n is not None}
            else:
                ids = adapters
                integer = not (ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool)
                check(integer and ids.dim() >= 1, "adapters", f"expected integer slot ids, got {ids.dtype} "
                      f"{tuple(ids.shape)}")
                check_values((ids, -1, self.max_adapters - 1, "adapters",
                              f"slot ids (-1 = base model; {self.max_adapters} slots)"))
                used = set(self.slots.values())
            self._in_use.update(used)
            if per_row:
                self._generate_users += 1
                if self._generate_users == 1:
                    self._unwrap_generate = self._wrap_generate()
        try:
            with selected(self._group, Selection(ids, per_row)):
                yield ids
        finally:
            with self._lock:
                self._in_use.subtract(used)
                self._in_use += collections.Counter()  # drop the zeros
                if per_row:
                    self._generate_users -= 1
                    if self._generate_users == 0 and self._unwrap_generate is not None:
                        self._unwrap_generate()
                        self._unwrap_generate = None

    def _wrap_generate(self):
        """Make ``self.model.generate``, while name batches are open, tell the layers that rows may
        come in k copies (for the caller's own batch only); returns the undo."""
        model = self.model
        generate = getattr(model, "generate", None)
        if not callable(generate):
            return None
        had = "generate" in vars(model)
        group = self._group

        def generate_with_repeats(*args, **kwargs):
            sel = current_selection(group)
            if sel is None or not sel.per_row:
                return generate(*args, **kwargs)
            with selected(group, Selection(sel.ids, True, rows_repeat=True)):
                return generate(*args, **kwargs)

        model.__dict__["generate"] = generate_with_repeats

        def undo():
            if had:
                model.__dict__["generate"] = generate
            else:
                model.__dict__.pop("generate", None)
        return undo


_GROUPS = itertools.count()  # one batch group per pool
