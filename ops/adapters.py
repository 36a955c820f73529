"""Single-adapter LoRA at model level, in PEFT's file format.

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

import json
import math
import os
import re
from typing import Iterable, Optional, Union

import torch
from torch import nn

from .layers import LoRALinear

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def _matches(name: str, targets: Union[str, Iterable[str]]) -> bool:
    """PEFT's rule: a string is a full-match regex on the module name; a list
    matches a module whose name equals an entry or ends with '.' + entry."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
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
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, target_modules)]
    if not names:
        raise ValueError(f"target_modules: no nn.Linear of the model matches {target_modules!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        layer = LoRALinear.from_linear(model.get_submodule(n), r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                       use_rslora=use_rslora, init_lora_weights=init_lora_weights)
        _set_submodule(model, n, layer)
    model._posttrain_lora_config = dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                        use_rslora=use_rslora, target_modules=sorted({n.split(".")[-1] for n in names}),
                                        init_lora_weights=init_lora_weights)
    return names


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def pattern_value(config: dict, field: str, name: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key that
    matches the end of the module name (a suffix such as ``q_proj`` or a full
    name), else ``default``."""
    for key, value in (config.get(field) or {}).items():
        if re.match(rf"(.*\.)?{key}$", name):
            return value
    return default


def write_adapter(path: Union[str, os.PathLike], tensors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  r: int, lora_alpha: float, target_modules: list[str], lora_dropout: float = 0.0,
                  use_rslora: bool = False, rank_pattern: Optional[dict] = None, alpha_pattern: Optional[dict] = None,
                  base_model_name_or_path: Optional[str] = None) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` as
    PEFT's ``save_pretrained`` does; ``tensors``: module name -> (A [r, in], B [out, r])."""
    from safetensors.torch import save_file
    config = {
        "peft_type": "LORA", "task_type": None, "r": r, "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout, "use_rslora": use_rslora, "bias": "none",
        "target_modules": target_modules, "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "base_model_name_or_path": base_model_name_or_path, "rank_pattern": rank_pattern or {},
        "alpha_pattern": alpha_pattern or {},
    }
    flat = {}
    for n, (a, b) in tensors.items():
        flat[f"{_PREFIX}{n}.lora_A.weight"] = a.detach().contiguous()
        flat[f"{_PREFIX}{n}.lora_B.weight"] = b.detach().contiguous()
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    save_file(flat, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})


def save_adapter(model: nn.Module, path: Union[str, os.PathLike], base_model_name_or_path: Optional[str] = None) -> None:
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


def read_adapter(path: Union[str, os.PathLike]) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(config, {module name: {"A": [r, in], "B": [out, r]}}) of a PEFT LoRA
    directory. Raises ``ValueError`` on a missing, corrupt or non-LoRA file."""
    from safetensors.torch import load_file
    cfg_path, w_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise ValueError(f"path: {p} does not exist")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"path: {cfg_path} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"path: {cfg_path} is not a LoRA adapter config (peft_type={config.get('peft_type')!r})")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)):
            raise ValueError(f"path: {cfg_path} has no numeric {key!r}")
    if config.get("use_dora") or config.get("fan_in_fan_out"):
        raise ValueError(f"path: {cfg_path} uses DoRA or fan_in_fan_out, which this package does not load")
    try:
        tensors = load_file(w_path)
    except Exception as e:  # safetensors raises its own error types on corrupt files
        raise ValueError(f"path: {w_path} is not a readable safetensors file ({e})") from None
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise ValueError(f"path: {w_path} holds a tensor this package does not load: {key}")
        layers.setdefault(m.group(1), {})[m.group(2)] = t
    for name, pair in layers.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"path: {w_path} misses lora_{'B' if 'A' in pair else 'A'} of {name}")
    return config, layers


def scaling_of(config: dict, name: str, r: int) -> tuple[float, float]:
    """(lora_alpha, scale) of module ``name`` with rank r under a PEFT config."""
    alpha = pattern_value(config, "alpha_pattern", name, config["lora_alpha"])
    return alpha, (alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)


def load_adapter(model: nn.Module, path: Union[str, os.PathLike]) -> list[str]:
    """Load a PEFT LoRA adapter directory into ``model``: modules already
    wrapped get their adapter weights replaced, plain ``nn.Linear`` targets are
    wrapped first. Every name, shape and rank is checked before the model is
    touched. Returns the module names loaded."""
    config, layers = read_adapter(path)
    plan = []
    for name, pair in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"path: the adapter targets {name}, which the model lacks") from None
        if not isinstance(module, (nn.Linear, LoRALinear)):
            raise ValueError(f"path: {name} is a {type(module).__name__}, not a Linear")
        out_f, in_f = (module.out_features, module.in_features)
        A, B = pair["A"], pair["B"]
        r = pattern_value(config, "rank_pattern", name, config["r"])
        if A.dim() != 2 or B.dim() != 2 or A.shape != (A.shape[0], in_f) or B.shape != (out_f, A.shape[0]):
            raise ValueError(f"path: {name}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit a "
                             f"[{out_f}, {in_f}] linear")
        if A.shape[0] != r:
            raise ValueError(f"path: {name}: rank {A.shape[0]} differs from the config's r={r}")
        plan.append((name, module, A, B, r))
    for name, module, A, B, r in plan:  # all checks passed: now change the model
        alpha, _ = scaling_of(config, name, r)
        if isinstance(module, LoRALinear) and module.r == r:
            layer = module
            layer.lora_alpha, layer.use_rslora = alpha, bool(config.get("use_rslora"))
            layer.scaling = alpha / math.sqrt(r) if layer.use_rslora else alpha / r
            layer.lora_dropout = float(config.get("lora_dropout", 0.0))
        else:
            linear = module if isinstance(module, nn.Linear) else _unwrap(module)
            layer = LoRALinear.from_linear(linear, r=r, lora_alpha=alpha,
                                           lora_dropout=float(config.get("lora_dropout", 0.0)),
                                           use_rslora=bool(config.get("use_rslora")))
            _set_submodule(model, name, layer)
        with torch.no_grad():
            layer.lora_A.weight.copy_(A)
            layer.lora_B.weight.copy_(B)
    return [p[0] for p in plan]


def _unwrap(layer: LoRALinear) -> nn.Linear:
    """A plain nn.Linear sharing ``layer``'s frozen weight and bias."""
    if layer.merged:
        layer.unmerge()
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                       device="meta")
    linear.weight = layer.weight
    linear.bias = layer.bias
    return linear
