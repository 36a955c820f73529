"""Single-adapter LoRA on a whole model, in PEFT's file format.

* ``apply_lora(model, target_modules, r, lora_alpha, ...)`` swaps the
  targeted ``nn.Linear`` modules for :class:`LoRALinear` (weights reused).
* ``save_adapter(model, path)`` writes ``adapter_config.json`` and
  ``adapter_model.safetensors`` as PEFT's ``save_pretrained`` does, so
  ``peft.PeftModel.from_pretrained`` loads them.
* ``load_adapter(model, path)`` reads such a directory (PEFT's own included)
  into a model, applying LoRA where needed. It validates everything first and
  changes the model only when the whole adapter is consistent.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Union

import torch
from torch import nn

from ..common import MAX_RANK, lora_scale
from ..lora.layer import LoRALinear
from .format import check_config, matches_target, read_adapter, validate_adapter, write_adapter


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_lora(model: nn.Module, target_modules: Union[str, Iterable[str]], r: int = 8, lora_alpha: float = 8,
               lora_dropout: float = 0.0, use_rslora: bool = False,
               init_lora_weights: Union[bool, str] = "kaiming") -> list[str]:
    """Replace every ``nn.Linear`` whose name matches ``target_modules`` by a
    :class:`LoRALinear` around it (its weight and bias reused and frozen).
    Every other parameter of the model is frozen too, as PEFT does. Returns
    the replaced module names; raises ``ValueError`` if none matched."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and matches_target(n, target_modules)]
    if not names:
        raise ValueError(f"target_modules: no nn.Linear of the model matches {target_modules!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        layer = LoRALinear.from_linear(model.get_submodule(n), r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                       use_rslora=use_rslora, init_lora_weights=init_lora_weights)
        set_submodule(model, n, layer)
    model._posttrain_lora_config = dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                        use_rslora=use_rslora, target_modules=sorted({n.split(".")[-1] for n in names}),
                                        init_lora_weights=init_lora_weights)
    return names


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def save_adapter(model: nn.Module, path: Union[str, os.PathLike],
                 base_model_name_or_path: Optional[str] = None) -> None:
    """Write the model's LoRA adapters in PEFT's format (one adapter; every
    layer must share r, alpha, dropout and rsLoRA, as one PEFT config does)."""
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("model: has no LoRALinear layer (call apply_lora first)")
    first = next(iter(layers.values()))
    for n, m in layers.items():
        if (m.r, m.lora_alpha, m.lora_dropout, m.use_rslora) != (first.r, first.lora_alpha, first.lora_dropout,
                                                                 first.use_rslora):
            raise ValueError(f"model: layer {n} has other LoRA settings than {next(iter(layers))}")
        if m.merged:
            raise ValueError(f"model: layer {n} is merged; unmerge before saving the adapter")
    write_adapter(path, {n: (m.lora_A.weight, m.lora_B.weight) for n, m in layers.items()}, first.r,
                  first.lora_alpha, sorted({n.split(".")[-1] for n in layers}), first.lora_dropout,
                  first.use_rslora, base_model_name_or_path=base_model_name_or_path)


def load_adapter(model: nn.Module, path: Union[str, os.PathLike]) -> list[str]:
    """Load a PEFT LoRA adapter directory into ``model``: modules already
    wrapped get their adapter weights replaced, plain ``nn.Linear`` targets are
    wrapped first. Every name, shape and rank is checked before the model is
    touched. Returns the module names loaded."""
    config, layers = read_adapter(path)
    shapes = {}
    for name, m in model.named_modules():
        parent = name.rpartition(".")[0]
        if isinstance(m, (nn.Linear, LoRALinear)) and not isinstance(_get(model, parent), LoRALinear):
            shapes[name] = (m.in_features, m.out_features)
    entries = validate_adapter(config, layers, shapes, "which the model lacks (or which is not a Linear)", MAX_RANK)
    use_rslora, dropout = bool(config.get("use_rslora")), check_config(config)
    for e in entries:  # all checks passed: now change the model
        module = model.get_submodule(e.name)
        if isinstance(module, LoRALinear) and module.r == e.r:
            layer = module
            layer.lora_alpha, layer.use_rslora = e.alpha, use_rslora
            layer.scaling = lora_scale(e.alpha, e.r, use_rslora)
            layer.lora_dropout = dropout
        else:
            linear = module if isinstance(module, nn.Linear) else _unwrap(module)
            layer = LoRALinear.from_linear(linear, r=e.r, lora_alpha=e.alpha, lora_dropout=dropout,
                                           use_rslora=use_rslora)
            set_submodule(model, e.name, layer)
        with torch.no_grad():
            layer.lora_A.weight.copy_(e.A)
            layer.lora_B.weight.copy_(e.B)
    return [e.name for e in entries]


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def _unwrap(layer: LoRALinear) -> nn.Linear:
    """A plain nn.Linear sharing ``layer``'s frozen weight and bias."""
    if layer.merged:
        layer.unmerge()
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                       device="meta")
    linear.weight = layer.weight
    linear.bias = layer.bias
    return linear
