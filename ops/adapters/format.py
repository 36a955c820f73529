"""PEFT's LoRA adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Reading and writing the files, PEFT's target-module matching rule, and its
``rank_pattern`` / ``alpha_pattern`` lookups, shared by the single-adapter
model functions (``model.py``) and the adapter pool (``pool.py``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Iterable, Optional, Union

import torch

from ..common import check_rate, is_fp32_number, is_number, lora_scale

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
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key (a
    regex) that matches the end of the module name after a dot or the whole
    name, else ``default``. The key is matched as a group, as PEFT's
    ``get_pattern_key`` does, so ``"q_proj|v_proj"`` covers both."""
    for key, value in (config.get(field) or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def scaling_of(config: dict, name: str, r: int) -> tuple[float, float]:
    """(lora_alpha, scale) of module ``name`` with rank r under a PEFT config."""
    alpha = pattern_value(config, "alpha_pattern", name, config["lora_alpha"])
    return alpha, lora_scale(alpha, r, bool(config.get("use_rslora")))


# init_lora_weights values whose initialisation also changes the base weights: an adapter saved
# without PEFT's conversion (save_pretrained(path_initial_model_for_weight_conversion=...)) only fits
# the modified base, not the original model.
_NEEDS_CONVERSION = ("pissa", "olora", "corda", "loftq", "lora_ga", "lora-ga")


@dataclasses.dataclass
class AdapterFile:
    """A PEFT LoRA directory as read: the config, ``{module: {"A": [r, in],
    "B": [out, r]}}``, and the full weights of ``modules_to_save``
    (``{module: {param: tensor}}``)."""

    config: dict
    lora: dict
    saved_modules: dict


def read_adapter_file(path: Union[str, os.PathLike]) -> AdapterFile:
    """Read a PEFT LoRA directory. Raises ``ValueError`` naming ``path`` on a
    missing, corrupt or non-LoRA file, a LoRA variant this package does not
    run (DoRA), or an initialisation that needs PEFT's conversion first."""
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
    if not isinstance(config, dict):
        raise ValueError(f"path: {cfg_path} holds a JSON {type(config).__name__}, not an adapter config object")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"path: {cfg_path} is not a LoRA adapter config (peft_type={config.get('peft_type')!r})")
    check_config_fields(config, cfg_path)
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)):
            raise ValueError(f"path: {cfg_path} has no numeric {key!r}")
    if config.get("use_dora"):
        raise ValueError(f"path: {cfg_path} uses DoRA, which this package does not load")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_NEEDS_CONVERSION):
        raise ValueError(f"path: {cfg_path} was initialised with init_lora_weights={init!r}, which also changes the "
                         f"base weights, and saved without conversion: it only fits that modified base model. Save "
                         f"it with PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=<dir of the "
                         f"adapter saved right after initialisation>) to turn it into a plain LoRA adapter of the "
                         f"original model")
    try:
        tensors = load_file(w_path)
    except Exception as e:  # safetensors raises its own error types on corrupt files
        raise ValueError(f"path: {w_path} is not a readable safetensors file ({e})") from None
    saved_targets = config.get("modules_to_save") or []
    layers: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is not None:
            pair = layers.setdefault(m.group(1), {})
            if m.group(2) in pair:  # e.g. with and without the base_model.model. prefix: which one is meant?
                raise ValueError(f"path: {w_path} holds two lora_{m.group(2)} tensors of {m.group(1)} (the second: "
                                 f"{key})")
            pair[m.group(2)] = t
            continue
        module, _, param = key.removeprefix(_PREFIX).rpartition(".")
        if saved_targets and matches_target(module, saved_targets):
            saved.setdefault(module, {})[param] = t
            continue
        raise ValueError(f"path: {w_path} holds a tensor this package does not load: {key}")
    for name, pair in layers.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"path: {w_path} misses lora_{'B' if 'A' in pair else 'A'} of {name}")
    return AdapterFile(config, layers, saved)


def read_adapter(path: Union[str, os.PathLike]) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(config, {module name: {"A": [r, in], "B": [out, r]}}) of a PEFT LoRA
    directory without ``modules_to_save`` weights (what the adapter pool
    holds); see ``read_adapter_file``."""
    f = read_adapter_file(path)
    if f.saved_modules:
        raise ValueError(f"path: the adapter also saves full modules ({', '.join(sorted(f.saved_modules))}: "
                         f"modules_to_save), which an adapter pool cannot hold per adapter; use load_adapter")
    return f.config, f.lora


@dataclasses.dataclass(frozen=True)
class AdapterEntry:
    """One module's adapter, checked: ``A [r, in]``, ``B [out, r]`` and its scale."""

    name: str
    A: torch.Tensor
    B: torch.Tensor
    r: int
    alpha: float
    scale: float


def check_config_fields(config: dict, where: str) -> None:
    """The fields read as regexes or lists, checked for type and syntax (``ValueError`` naming the
    file and the field, not a ``TypeError`` / ``re.error`` from deep inside a load)."""
    targets = config.get("target_modules")
    if targets is not None and not (isinstance(targets, str) or (
            isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise ValueError(f"path: {where}: target_modules must be a string (a regex) or a list of module names, "
                         f"got {targets!r}")
    regexes = [("target_modules", targets)] if isinstance(targets, str) else []
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(field)
        if isinstance(pattern, dict):
            regexes += [(f"{field} key", key) for key in pattern]
    for field, regex in regexes:
        try:
            re.compile(regex)
        except re.error as e:
            raise ValueError(f"path: {where}: {field} {regex!r} is not a valid regex ({e})") from None


def check_config(config: dict) -> float:
    """The config fields a load reads, checked (``ValueError`` naming ``path``);
    returns its ``lora_dropout`` as a float."""
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict):
            raise ValueError(f"path: {field} must be an object, got {pattern!r}")
        for key, value in pattern.items():
            ok = is_number(value) and value >= 1 and value == int(value) if field == "rank_pattern" else \
                is_fp32_number(value)
            if not ok:
                raise ValueError(f"path: {field}[{key!r}] must be a "
                                 f"{'positive int' if field == 'rank_pattern' else 'number finite in fp32'}, "
                                 f"got {value!r}")
    if "lora_alpha" in config and not is_fp32_number(config["lora_alpha"]):
        # NaN and Infinity are valid to Python's json; 1e40 is finite in float64 but not in fp32 scales
        raise ValueError(f"path: lora_alpha must be a number finite in fp32, got {config['lora_alpha']!r}")
    dropout = config.get("lora_dropout") or 0.0
    check_rate(dropout, "path: lora_dropout")
    return float(dropout)


def validate_adapter(config: dict, tensors: dict, shapes: dict, missing: str,
                     max_rank: int) -> tuple[list[AdapterEntry], float]:
    """Check an adapter (``read_adapter``'s config and tensors) against the
    linear layers it is to go into, before anything changes: the one
    validator of ``load_adapter`` and ``AdapterPool.load``.

    ``shapes``: module name -> (in_features, out_features) of every layer the
    adapter may target; ``missing``: how to say that a name is not among them.
    Checks: every tensor's module is a layer, floating tensors of the layer's
    shapes, rank in [1, max_rank] and equal to the config's ``r`` (or its
    ``rank_pattern`` entry), numeric patterns and dropout, and every layer the
    config's ``target_modules`` name holds weights in the file. Raises
    ``ValueError`` naming ``path``; returns the entries in file order and
    the config's ``lora_dropout``."""
    dropout = check_config(config)
    entries = []
    for name, pair in tensors.items():
        if name not in shapes:
            raise ValueError(f"path: the adapter targets {name}, {missing}")
        in_f, out_f = shapes[name]
        A, B = pair["A"], pair["B"]
        for which, t in (("lora_A", A), ("lora_B", B)):
            if not t.is_floating_point():
                raise ValueError(f"path: {name}: {which} holds {t.dtype}, not floating-point weights")
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != in_f or tuple(B.shape) != (out_f, A.shape[0]):
            raise ValueError(f"path: {name}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit a "
                             f"[{out_f}, {in_f}] linear")
        r = A.shape[0]
        if not 1 <= r <= max_rank:
            raise ValueError(f"path: {name}: rank {r} is outside [1, max_rank={max_rank}]")
        want = pattern_value(config, "rank_pattern", name, config["r"])
        if r != want:
            raise ValueError(f"path: {name}: rank {r} differs from the config's r={want}")
        alpha, scale = scaling_of(config, name, r)
        entries.append(AdapterEntry(name, A, B, r, alpha, scale))
    targets = config.get("target_modules")
    restricted = any(config.get(k) for k in ("layers_to_transform", "layers_pattern", "exclude_modules"))
    if targets and targets != "all-linear" and not restricted:
        lacking = sorted(n for n in shapes if matches_target(n, targets) and n not in tensors)
        if lacking:
            raise ValueError(f"path: the config's target_modules cover {lacking[0]}"
                             f"{f' (and {len(lacking) - 1} more)' if len(lacking) > 1 else ''}, but the file holds "
                             f"no weights for it")
    return entries, dropout


def write_adapter(path: Union[str, os.PathLike], tensors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  r: int, lora_alpha: float, target_modules: list[str], lora_dropout: float = 0.0,
                  use_rslora: bool = False, rank_pattern: Optional[dict] = None, alpha_pattern: Optional[dict] = None,
                  base_model_name_or_path: Optional[str] = None, fan_in_fan_out: bool = False,
                  saved_modules: Optional[dict] = None, target_parameters: Optional[list] = None) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` as
    PEFT's ``save_pretrained`` does; ``tensors``: module name -> (A [r, in],
    B [out, r]); ``saved_modules``: module name -> {param: tensor} of
    ``modules_to_save`` (full weights, PEFT's layout); ``target_parameters``: the expert
    parameters PEFT's ``ParamWrapper`` adapters of ``tensors`` target (``ops/adapters/experts.py``)."""
    from safetensors.torch import save_file
    config = {
        "peft_type": "LORA", "task_type": None, "r": r, "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout, "use_rslora": use_rslora, "bias": "none",
        "target_modules": target_modules, "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": sorted(saved_modules) if saved_modules else None,
        "base_model_name_or_path": base_model_name_or_path, "rank_pattern": rank_pattern or {},
        "alpha_pattern": alpha_pattern or {},
    }
    if target_parameters:
        config["target_parameters"] = list(target_parameters)
    flat = {}
    for n, (a, b) in tensors.items():
        flat[f"{_PREFIX}{n}.lora_A.weight"] = a.detach().contiguous()
        flat[f"{_PREFIX}{n}.lora_B.weight"] = b.detach().contiguous()
    for n, params in (saved_modules or {}).items():
        for p, t in params.items():
            flat[f"{_PREFIX}{n}.{p}"] = t.detach().contiguous()
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    save_file(flat, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
