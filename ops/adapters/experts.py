"""PEFT's ``target_parameters`` adapters of MoE experts, read into and
written from this package's MoE layers (``Experts`` of ``TopKMoE`` /
``ExpertChoiceMoE``, ``convert_moe`` / ``from_hf`` outputs included).

PEFT's file layout, per targeted 3-D expert parameter (``gate_up_proj`` or
``down_proj`` of one experts module): ``lora_A.weight [E·r, in]`` (expert
e's rows ``e·r:(e+1)·r``) and ``lora_B.weight [out, r·E]`` (column
``j·E + e`` is rank j of expert e), where in/out follow the parameter's
orientation (``is_transposed``). Several parameters of one module are
nested ``ParamWrapper`` layers, wrapped in the module's parameter order
(``gate_up_proj`` first), so the file names the last one ``<module>`` and
each earlier one with one more ``.base_layer``.

This package's layers keep one ``ExpertLoRA`` per target (``gate_up``: A
``[E, r, d]``, B ``[E, 2F, r]`` with the gate's F outputs first; ``down``:
A ``[E, r, F]``, B ``[E, d, r]``). The converted layer remembers the
Hugging Face layout it came from (``Experts.hf_layout``: ``"concatenated"``,
gate rows then up rows, as Qwen3-MoE / Mixtral / OLMoE / DeepSeek; or
``"interleaved"``, gate and up alternating, as GPT-OSS), so B's rows of
``gate_up_proj`` are read and written in the file's order.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..common import check
from ..moe.layer import Experts
from ..moe.lora import peft_expert_factors
from .format import pattern_value, scaling_of

PARAMS = ("gate_up_proj", "down_proj")  # transformers' declaration order of the fused expert parameters
TARGET_OF = {"gate_up_proj": "gate_up", "down_proj": "down"}


def expert_modules(model: nn.Module) -> dict[str, Experts]:
    """Every ``Experts`` module of ``model`` (shared experts excluded), by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Experts) and not n.endswith("shared_expert.mlp")}


def split_expert_entries(model: nn.Module, config: dict, lora: dict) -> tuple[dict, dict]:
    """(expert entries ``{(module, param): {"A", "B"}}``, the other entries as they were) of a read
    adapter file: a name that is an ``Experts`` module of the model, with or without ``.base_layer``
    suffixes, is an expert parameter's adapter; which one follows from PEFT's nesting order."""
    experts = expert_modules(model)
    targets = config.get("target_parameters") or []
    found, rest = {}, {}
    for name, pair in lora.items():
        base, depth = name, 0
        while base.endswith(".base_layer"):
            base, depth = base[: -len(".base_layer")], depth + 1
        if base not in experts:
            rest[name] = pair
            continue
        params = [p for p in PARAMS if any(f"{base}.{p}" == t or f"{base}.{p}".endswith("." + t) for t in targets)]
        if not params:
            raise ValueError(f"path: the adapter holds weights of {name}, but its config's target_parameters "
                             f"({targets}) name no expert parameter of {base}")
        if depth >= len(params):
            raise ValueError(f"path: {name}: nested {depth} deep, but target_parameters name {len(params)} "
                             f"parameter(s) of {base}")
        found[(base, params[len(params) - 1 - depth])] = pair
    return found, rest


def _gate_up_rows(layout: str, F: int, device) -> torch.Tensor:
    """Rows of the file's ``gate_up_proj`` B in this package's order (gate's F, then up's F)."""
    if layout == "interleaved":
        return torch.cat([torch.arange(0, 2 * F, 2, device=device), torch.arange(1, 2 * F, 2, device=device)])
    return torch.arange(2 * F, device=device)


def validate_expert_entries(model: nn.Module, config: dict, entries: dict, max_rank: int) -> list[tuple]:
    """Check each expert adapter against its experts before anything changes; returns
    ``(module, param, A [E, r, in], B [E, out, r] in this package's row order, r, alpha)``."""
    experts = expert_modules(model)
    out = []
    for (module, param), pair in entries.items():
        ex = experts[module]
        check(param != "gate_up_proj" or ex.gated, "path", f"{module}: gate_up_proj of plain (ungated) experts")
        ws, _ = ex.projections()[TARGET_OF[param]]
        E, d_in, d_out = ws[0].shape[0], ws[0].shape[1], sum(w.shape[2] for w in ws)
        A, B = pair["A"], pair["B"]
        if not (A.is_floating_point() and B.is_floating_point()):
            raise ValueError(f"path: {module}.{param}: lora_A / lora_B are not floating-point weights")
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != d_in or A.shape[0] % E or B.shape[0] != d_out \
                or B.shape[1] != A.shape[0]:
            raise ValueError(f"path: {module}.{param}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit "
                             f"{E} experts of [{d_in} -> {d_out}] (expected [{E}·r, {d_in}] and [{d_out}, r·{E}])")
        r = A.shape[0] // E
        name = f"{module}.{param}"
        want = pattern_value(config, "rank_pattern", name, config["r"])
        if not 1 <= r <= max_rank or r != want:
            raise ValueError(f"path: {name}: rank {r} (lora_A rows / experts) differs from the config's r={want} "
                             f"or is outside [1, {max_rank}]")
        alpha, _ = scaling_of(config, name, r)
        a, b = peft_expert_factors(A, B, E)
        if param == "gate_up_proj":
            b = b[:, _gate_up_rows(getattr(ex, "hf_layout", "concatenated"), d_out // 2, b.device)]
        out.append((module, param, a, b, r, alpha))
    return out


def apply_expert_entries(model: nn.Module, entries: list[tuple], config: dict) -> None:
    """Put validated expert adapters into the model's ``Experts`` (adding LoRA where needed)."""
    experts = expert_modules(model)
    rslora = bool(config.get("use_rslora"))
    for module, param, a, b, r, alpha in entries:
        ex = experts[module]
        if ex.lora_merged:
            ex.unmerge_lora()
        ex.add_lora(r, alpha, targets=(TARGET_OF[param],), use_rslora=rslora)
        adapter = ex.lora[TARGET_OF[param]]
        with torch.no_grad():
            adapter.lora_A.copy_(a)
            adapter.lora_B.copy_(b)


def expert_tensors(model: nn.Module) -> tuple[dict, list[str], Optional[tuple]]:
    """(file module name -> (lora_A [E·r, in], lora_B [out, r·E]), target_parameters, (r, alpha,
    rslora) shared by every expert adapter or None when there is none) for ``save_adapter``."""
    tensors, targets, settings = {}, [], None
    for module, ex in expert_modules(model).items():
        present = [p for p in PARAMS if TARGET_OF[p] in ex.lora]
        check(not (present and ex.lora_merged), "model", f"{module}: the expert adapters are merged; unmerge first")
        for i, param in enumerate(present):
            adapter = ex.lora[TARGET_OF[param]]
            E, r = adapter.lora_A.shape[0], adapter.r
            ranks, alphas = set(adapter.ranks.tolist()), set(adapter.alphas or ())
            mine = (r, alphas.pop() if len(alphas) == 1 else None, adapter.use_rslora)
            check(ranks == {r} and mine[1] is not None, "model",
                  f"{module}.{param}: per-expert rank or alpha patterns have no PEFT file form")
            check(settings is None or settings == mine, "model",
                  f"{module}.{param}: other LoRA settings {mine} than the other expert adapters {settings}")
            settings = mine
            b = adapter.lora_B
            if param == "gate_up_proj":
                rows = _gate_up_rows(getattr(ex, "hf_layout", "concatenated"), b.shape[1] // 2, b.device)
                b = torch.empty_like(b).index_copy_(1, rows, b)  # back to the file's row order
            flat_a = adapter.lora_A.reshape(E * r, adapter.lora_A.shape[2])
            flat_b = b.permute(1, 2, 0).reshape(b.shape[1], r * E)
            tensors[module + ".base_layer" * (len(present) - 1 - i)] = (flat_a, flat_b)
            targets.append(f"{module}.{param}")
    return tensors, targets, settings
