"""PEFT's LoRA adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Reading and writing the files, PEFT's target-module matching rule, and its
``rank_pattern`` / ``alpha_pattern`` lookups, shared by the single-adapter
model functions (``model.py``) and the adapter pool (``pool.py``).
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterable, Optional, Union

import torch

from ..common import lora_scale

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def matches_target(name: str, targets: Union[str, Iterable[str]]) -> bool:
    """PEFT's rule: a string is a full-match regex on the module name; a list
    matches a module whose name equals an entry or ends with '.' + entry."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def pattern_value(config: dict, field: str, name: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key that
    matches the end of the module name (a suffix such as ``q_proj`` or a full
    name), else ``default``."""
    for key, value in (config.get(field) or {}).items():
        if re.match(rf"(.*\.)?{key}$", name):
            return value
    return default


def scaling_of(config: dict, name: str, r: int) -> tuple[float, float]:
    """(lora_alpha, scale) of module ``name`` with rank r under a PEFT config."""
    alpha = pattern_value(config, "alpha_pattern", name, config["lora_alpha"])
    return alpha, lora_scale(alpha, r, bool(config.get("use_rslora")))


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
