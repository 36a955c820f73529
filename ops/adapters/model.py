"""Single-adapter LoRA on a whole model, in PEFT's file format.

* ``apply_lora(model, target_modules, r, lora_alpha, ...)`` swaps the
  targeted linear layers (``nn.Linear``, transformers' ``Conv1D``) for
  :class:`LoRALinear` (weights reused); ``modules_to_save`` stay trainable.
* ``save_adapter(model, path)`` writes ``adapter_config.json`` and
  ``adapter_model.safetensors`` as PEFT's ``save_pretrained`` does, so
  ``peft.PeftModel.from_pretrained`` loads them.
* ``load_adapter(model, path)`` reads such a directory (PEFT's own included)
  into a model, applying LoRA where needed. It validates everything first and
  changes the model only when the whole adapter is consistent; afterwards
  only the adapters (and ``modules_to_save``) train, as with PEFT's
  ``is_trainable=True``.
* ``merge_and_unload(model)`` folds every adapter into its base layer;
  ``disable_adapter(model)`` runs the base model inside a ``with`` block.
* ``fsdp_auto_wrap_policy(model)``: FSDP1 units by transformer block.
"""
from __future__ import annotations

import contextlib
import copy
import os
from typing import Iterable, Optional, Union

import torch
from torch import nn

from ..common import MAX_RANK, FrozenLinearWrapper, is_linear, lora_scale, set_submodule, weight_out_in
from ..lora.layer import LoRALinear
from ..quant.layer import is_quantized_linear
from . import experts as expert_files
from .format import matches_target, read_adapter_file, validate_adapter, write_adapter

_ORIGINALS = "_posttrain_modules_to_save_originals"


def _default_targets(model: nn.Module) -> list[str]:
    """PEFT's per-architecture default ``target_modules`` (``target_modules=None``)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults
    except ImportError:  # the common ones, as PEFT lists them
        defaults = {"llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
                    "gpt2": ["c_attn"], "opt": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"]}
    if model_type not in defaults:
        raise ValueError(f"target_modules: None needs a known architecture, and {model_type!r} has no default "
                         f"target modules: name them")
    return list(defaults[model_type])


def _target(module: nn.Module) -> bool:
    """A layer LoRA can wrap: ``nn.Linear``, ``Conv1D``, or a 4-bit linear (bitsandbytes' ``Linear4bit``,
    ``QuantLinear``)."""
    return is_linear(module) or is_quantized_linear(module)


def _features(module: nn.Module) -> tuple:
    """(in, out) of a layer ``_target`` accepts, or of a LoRA layer."""
    if isinstance(module, LoRALinear) or is_quantized_linear(module):
        return module.in_features, module.out_features
    return tuple(weight_out_in(module).shape[::-1])


def resolve_targets(model: nn.Module, target_modules) -> list[str]:
    """The names of the linear layers LoRA goes on, by PEFT's rules: a list
    matches a name or its last components, a string is a full-match regex,
    ``"all-linear"`` is every linear layer but the output layer, and ``None``
    is PEFT's default for the model's architecture. 4-bit linear layers
    count as linear layers (QLoRA)."""
    linears = [(n, m) for n, m in model.named_modules() if _target(m) and not _inside_lora(model, n)]
    if target_modules is None:
        target_modules = _default_targets(model)
    if target_modules == "all-linear":
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return [n for n, m in linears if m is not output]
    return [n for n, _ in linears if matches_target(n, target_modules)]


def _inside_lora(model: nn.Module, name: str) -> bool:
    """A module of a LoRA layer (its ``lora_A`` / ``lora_B``), not of the model."""
    parent = name.rpartition(".")[0]
    return isinstance(model.get_submodule(parent) if parent else model, FrozenLinearWrapper)


def apply_lora(model: nn.Module, target_modules: Union[str, Iterable[str], None] = None, r: int = 8,
               lora_alpha: float = 8, lora_dropout: float = 0.0, use_rslora: bool = False,
               init_lora_weights: Union[bool, str] = "kaiming",
               modules_to_save: Optional[Iterable[str]] = None) -> list[str]:
    """Replace every linear layer (``nn.Linear`` or transformers ``Conv1D``)
    that ``target_modules`` selects (PEFT's rules, ``"all-linear"`` and
    ``None`` included: see ``resolve_targets``) by a :class:`LoRALinear`
    around it (its weight and bias reused and frozen). Every other parameter
    of the model is frozen too, as PEFT does, except the modules named in
    ``modules_to_save`` (e.g. ``["lm_head"]``), which train in full and are
    saved with the adapter. Returns the replaced module names; raises
    ``ValueError`` if none matched."""
    names = resolve_targets(model, target_modules)
    if not names:
        raise ValueError(f"target_modules: no linear layer of the model matches {target_modules!r}")
    saved = [n for n, _ in model.named_modules() if modules_to_save and n and matches_target(n, list(modules_to_save))]
    if modules_to_save and not saved:
        raise ValueError(f"modules_to_save: no module of the model matches {list(modules_to_save)!r}")
    layers = {n: LoRALinear.from_linear(model.get_submodule(n), r=r, lora_alpha=lora_alpha,
                                        lora_dropout=lora_dropout, use_rslora=use_rslora,
                                        init_lora_weights=init_lora_weights) for n in names}  # checks first
    for p in model.parameters():
        p.requires_grad_(False)
    for n, layer in layers.items():
        set_submodule(model, n, layer)
    _keep_trainable(model, saved)
    return names


def _keep_trainable(model: nn.Module, saved: list[str]) -> None:
    """``modules_to_save``: trainable in full, with a frozen copy of the
    original kept for ``disable_adapter``."""
    originals = model.__dict__.setdefault(_ORIGINALS, {})
    for n in saved:
        module = model.get_submodule(n)
        if n not in originals:
            originals[n] = copy.deepcopy(module).requires_grad_(False)
        module.requires_grad_(True)


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def target_list(model: nn.Module, wrapped: Iterable[str]) -> list[str]:
    """``target_modules`` to save: the wrapped layers' last name components
    when those select exactly the wrapped layers, else their full names (a
    layer-restricted target must not widen when PEFT reads it back)."""
    wrapped = set(wrapped)
    suffixes = sorted({n.split(".")[-1] for n in wrapped})
    selected = {n for n, m in model.named_modules() if _target(m) or isinstance(m, FrozenLinearWrapper)}
    selected = {n for n in selected if not _inside_lora(model, n) and matches_target(n, suffixes)}
    return suffixes if selected == wrapped else sorted(wrapped)


def save_adapter(model: nn.Module, path: Union[str, os.PathLike],
                 base_model_name_or_path: Optional[str] = None) -> None:
    """Write the model's LoRA adapters in PEFT's format (one adapter; every
    layer must share r, alpha, dropout and rsLoRA, as one PEFT config does),
    with the ``modules_to_save`` weights. Adapters on MoE experts
    (``add_expert_lora``) are written as PEFT's ``target_parameters``
    adapters of the expert parameters (``ops/adapters/experts.py``), so a
    model converted with ``convert_moe`` saves a file PEFT loads into the
    original transformers model."""
    layers = _lora_layers(model)
    expert, target_parameters, expert_settings = expert_files.expert_tensors(model)
    if not layers and not expert:
        raise ValueError("model: has no LoRALinear layer or expert adapter (call apply_lora or add_expert_lora first)")
    first = next(iter(layers.values()), None)
    for n, m in layers.items():
        if (m.r, m.lora_alpha, m.lora_dropout, m.use_rslora) != (first.r, first.lora_alpha, first.lora_dropout,
                                                                 first.use_rslora):
            raise ValueError(f"model: layer {n} has other LoRA settings than {next(iter(layers))}")
        if m.merged:
            raise ValueError(f"model: layer {n} is merged; unmerge before saving the adapter")
    r, alpha, rslora = (first.r, first.lora_alpha, first.use_rslora) if first is not None else expert_settings
    if first is not None and expert_settings is not None and expert_settings != (r, alpha, rslora):
        raise ValueError(f"model: the expert adapters' (r, alpha, rslora) {expert_settings} differ from the linear "
                         f"layers' {(r, alpha, rslora)}: one PEFT config holds one")
    saved = {n: dict(model.get_submodule(n).named_parameters()) for n in model.__dict__.get(_ORIGINALS, {})}
    tensors = {n: (m.lora_A.weight, m.lora_B.weight) for n, m in layers.items()}
    tensors.update(expert)
    write_adapter(path, tensors, r, alpha, target_list(model, layers), first.lora_dropout if first else 0.0,
                  rslora, base_model_name_or_path=base_model_name_or_path,
                  fan_in_fan_out=any(m.fan_in_fan_out for m in layers.values()), saved_modules=saved,
                  target_parameters=target_parameters)


def load_adapter(model: nn.Module, path: Union[str, os.PathLike]) -> list[str]:
    """Load a PEFT LoRA adapter directory into ``model``: modules already
    wrapped get their adapter weights replaced, plain linear targets
    (``nn.Linear``, ``Conv1D``) are wrapped first, ``modules_to_save``
    weights are copied in. Every name, shape and rank is checked before the
    model is touched. Afterwards only the adapters and ``modules_to_save``
    train (PEFT's ``is_trainable=True``). Adapters of expert parameters
    (PEFT's ``target_parameters``) go into the model's MoE layers
    (``add_expert_lora``; a ``convert_moe`` output reads the file of the
    original transformers model). Returns the LoRA module names (expert
    adapters as ``<experts module>.<parameter>``)."""
    file = read_adapter_file(path)
    config = file.config
    expert_entries, linear_lora = expert_files.split_expert_entries(model, config, file.lora)
    experts = expert_files.validate_expert_entries(model, config, expert_entries, MAX_RANK)
    shapes = {}
    for name, m in model.named_modules():
        if (_target(m) or isinstance(m, LoRALinear)) and not _inside_lora(model, name):
            shapes[name] = _features(m)
    entries, dropout = validate_adapter(config, linear_lora, shapes, "which the model lacks (or which is not a Linear)",
                                        MAX_RANK)
    for name, params in file.saved_modules.items():
        try:
            own = dict(model.get_submodule(name).named_parameters())
        except AttributeError:
            raise ValueError(f"path: modules_to_save names {name}, which the model lacks") from None
        for p, t in params.items():
            if p not in own or tuple(own[p].shape) != tuple(t.shape):
                raise ValueError(f"path: modules_to_save {name}.{p} {tuple(t.shape)} does not fit the model's "
                                 f"{tuple(own[p].shape) if p in own else 'missing parameter'}")
    use_rslora = bool(config.get("use_rslora"))
    for e in entries:  # all checks passed: now change the model
        module = model.get_submodule(e.name)
        if isinstance(module, LoRALinear) and module.r == e.r:
            layer = module
            layer.lora_alpha, layer.use_rslora = e.alpha, use_rslora
            layer.scaling = lora_scale(e.alpha, e.r, use_rslora)
            layer.lora_dropout = dropout
        else:
            linear = module.base_linear() if isinstance(module, LoRALinear) else module
            if isinstance(module, LoRALinear) and module.merged:
                module.unmerge()
            layer = LoRALinear.from_linear(linear, r=e.r, lora_alpha=e.alpha, lora_dropout=dropout,
                                           use_rslora=use_rslora)
            set_submodule(model, e.name, layer)
        with torch.no_grad():
            layer.lora_A.weight.copy_(e.A)
            layer.lora_B.weight.copy_(e.B)
    expert_files.apply_expert_entries(model, experts, config)
    for p in model.parameters():  # train the adapters alone, as PeftModel.from_pretrained(is_trainable=True)
        p.requires_grad_(False)
    for layer in _lora_layers(model).values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    for ex in expert_files.expert_modules(model).values():
        for adapter in ex.lora.values():
            adapter.lora_A.requires_grad_(True)
            adapter.lora_B.requires_grad_(True)
    with torch.no_grad():
        for name, params in file.saved_modules.items():
            own = dict(model.get_submodule(name).named_parameters())
            for p, t in params.items():
                own[p].copy_(t)
    _keep_trainable(model, list(file.saved_modules))
    return [e.name for e in entries] + [f"{module}.{param}" for module, param, *_ in experts]


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain layer
    (``nn.Linear`` / ``Conv1D``) back: PEFT's ``merge_and_unload``. A layer over
    a 4-bit base becomes an ``nn.Linear`` in the base's dtype holding the
    decoded base plus s·B·A (the sum has no 4-bit form; PEFT requantizes it,
    which changes the base). Expert
    adapters (``add_expert_lora``) are folded into their experts and
    removed. The ``modules_to_save`` keep their trained weights. Returns ``model``."""
    for name, layer in _lora_layers(model).items():
        if getattr(layer, "quantized", False):  # a 4-bit base cannot hold the sum: a dense layer takes its place
            set_submodule(model, name, layer.merged_linear())
            continue
        if not layer.merged:
            layer.merge()
        set_submodule(model, name, layer.base_linear())
    for ex in expert_files.expert_modules(model).values():  # expert adapters: folded into the experts, dropped
        if len(ex.lora):
            ex.merge_lora()
            ex.lora = torch.nn.ModuleDict()
            ex.lora_merged = False
    model.__dict__.pop(_ORIGINALS, None)
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Inside the block the model is its base: every LoRA layer runs its
    base layer alone, every MoE layer its experts without their adapters,
    and every ``modules_to_save`` module its original weights (PEFT's
    ``disable_adapter()``, e.g. for DPO's reference model)."""
    layers = list(_lora_layers(model).values())
    experts = list(expert_files.expert_modules(model).values())
    originals = model.__dict__.get(_ORIGINALS, {})
    trained = {n: model.get_submodule(n) for n in originals}
    for layer in layers:
        layer.disabled = True
    remerge = [ex for ex in experts if ex.lora_merged]
    for ex in remerge:  # a merged expert adapter is in the weights: take it out for the block
        ex.unmerge_lora()
    for ex in experts:
        ex.lora_enabled = False
    for n, original in originals.items():
        set_submodule(model, n, original.to(next(trained[n].parameters()).device))
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
        for ex in experts:
            ex.lora_enabled = True
        for ex in remerge:
            ex.merge_lora()
        for n, module in trained.items():
            set_submodule(model, n, module)


def fsdp_auto_wrap_policy(model: nn.Module):
    """An FSDP1 ``auto_wrap_policy`` that makes each transformer block one
    unit, its LoRA layers inside: the fused layers read their adapter weights
    directly, so ``lora_A`` / ``lora_B`` must not be units of their own (PEFT's
    ``fsdp_auto_wrap_policy`` makes them so). Use it with
    ``use_orig_params=True`` (frozen and trainable weights share a unit).
    The blocks are the entries of the model's ``nn.ModuleList`` s of one
    class that hold linear layers."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    classes = set()
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1:
            if any(is_linear(x) or isinstance(x, FrozenLinearWrapper) for x in m[0].modules()):
                classes.add(type(m[0]))
    if not classes:
        raise ValueError("model: found no list of transformer blocks to wrap; pass your block class to "
                         "torch's transformer_auto_wrap_policy")
    import functools
    return functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=classes)
