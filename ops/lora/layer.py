"""``LoRALinear``: a drop-in ``nn.Linear`` with one LoRA adapter. It calls
the functional API only; no Triton here."""
from __future__ import annotations

import math
import warnings
from typing import Optional, Union

import torch
from torch import nn

from ..common import MAX_RANK, FrozenLinearWrapper, check, check_rate, is_number, lora_scale
from ..quant.layer import QuantizedBase, is_quantized_linear
from .function import lora_linear

INIT_CHOICES = (True, False, "kaiming", "gaussian")


def check_init(init_lora_weights) -> None:
    if init_lora_weights not in INIT_CHOICES:
        raise ValueError(f"init_lora_weights: expected True, False, 'kaiming' or 'gaussian', got {init_lora_weights!r}")


@torch.no_grad()
def init_lora_(lora_a: torch.Tensor, lora_b: torch.Tensor, init_lora_weights: Union[bool, str] = "kaiming") -> None:
    """PEFT's initialisation of ``lora_a [r, in]`` and ``lora_b [out, r]``, in
    place: ``"kaiming"`` / ``True`` (A kaiming-uniform with a=√5, B zero),
    ``"gaussian"`` (A ~ N(0, 1/r), B zero), ``False`` (B kaiming-uniform too:
    the adapter is not a no-op; for tests)."""
    check_init(init_lora_weights)
    if init_lora_weights == "gaussian":
        nn.init.normal_(lora_a, std=1.0 / lora_a.shape[0])
    else:
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
    if init_lora_weights is False:
        nn.init.kaiming_uniform_(lora_b, a=math.sqrt(5))
    else:
        nn.init.zeros_(lora_b)


class LoRALinear(FrozenLinearWrapper):
    """Drop-in ``nn.Linear`` with a LoRA adapter: ``y = W0·x + s·B(A·dropout(x)) + b``.

    ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``).
    The frozen ``weight`` and ``bias`` get no gradient; ``lora_A.weight``
    ``[r, in]`` and ``lora_B.weight`` ``[out, r]`` are trained, and their
    state-dict keys end as PEFT's do. Adapters default to fp32 (PEFT's
    default) whatever the base dtype; the kernels cast them per tile.

    ``init_lora_weights``: ``"kaiming"`` or ``True`` (A kaiming-uniform with
    a=√5, PEFT's default), ``"gaussian"`` (A ~ N(0, 1/r), the LoRA paper),
    ``False`` (B random too, so the adapter is not a no-op; for tests).
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, bias: bool = True, use_rslora: bool = False,
                 init_lora_weights: Union[bool, str] = "kaiming", device=None, dtype=None,
                 adapter_dtype: Optional[torch.dtype] = torch.float32):
        super().__init__()
        self._setup(nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype), r, lora_alpha,
                    lora_dropout, use_rslora, init_lora_weights, adapter_dtype)

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights: Union[bool, str] = "kaiming",
                    adapter_dtype: Optional[torch.dtype] = torch.float32) -> "LoRALinear":
        """Wrap ``linear`` (an ``nn.Linear``, or a transformers ``Conv1D`` as in
        GPT-2, whose ``[in, out]`` weight stays as it is): its weight and bias
        Parameters are reused (no copy) and frozen. A quantized linear layer
        (bitsandbytes' ``Linear4bit``, ``QuantLinear``) gives a ``QLoRALinear``."""
        if is_quantized_linear(linear) and not issubclass(cls, QuantizedBase):
            cls = QLoRALinear
        return super(LoRALinear, cls).from_linear(linear, r, lora_alpha, lora_dropout, use_rslora,
                                                  init_lora_weights, adapter_dtype)

    def _setup(self, linear, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, adapter_dtype):
        if not isinstance(r, int) or not 1 <= r <= MAX_RANK:
            raise ValueError(f"r: must be an int in [1, {MAX_RANK}], got {r!r}")
        check_rate(lora_dropout, "lora_dropout")
        check(is_number(lora_alpha), "lora_alpha", f"expected a finite number, got {lora_alpha!r}")
        check_init(init_lora_weights)
        self._adopt(linear)
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = use_rslora
        self.scaling = lora_scale(lora_alpha, r, use_rslora)
        dtype = adapter_dtype or self.base_dtype
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=self.base_device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=self.base_device, dtype=dtype)
        self.merged = False
        self.disabled = False  # the base layer alone (``disable_adapter``)
        self.tensor_shard = None  # set by tensor parallelism (ops/lora/parallel.py)
        self.reset_lora_parameters(init_lora_weights)
        # A merged layer's state_dict holds the unmerged weight (with the adapter next to it): the one
        # representation any loader reads right. Loaded into a merged layer, the delta is merged again.
        self._register_state_dict_hook(_unmerged_weight_in_state)
        self.register_load_state_dict_post_hook(_merge_again_after_load)

    def reset_lora_parameters(self, init_lora_weights: Union[bool, str] = "kaiming") -> None:
        init_lora_(self.lora_A.weight, self.lora_B.weight, init_lora_weights)

    def delta_weight(self) -> torch.Tensor:
        """s·B·A in fp32, the update a merge adds to the weight, in the
        weight's own layout ([out, in]; [in, out] for a Conv1D base)."""
        delta = self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())
        return delta.t() if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        """Fold s·B·A into the weight: the forward becomes one plain GEMM."""
        if self.merged:
            warnings.warn("LoRALinear.merge(): already merged; nothing done")
            return
        self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract s·B·A again; the weight comes back within rounding."""
        if not self.merged:
            warnings.warn("LoRALinear.unmerge(): not merged; nothing done")
            return
        self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self._base_forward(x)
        p = self.lora_dropout if self.training else 0.0
        if self.tensor_shard is not None:  # split by LoRAColwiseParallel / LoRARowwiseParallel
            from .parallel import sharded_forward
            return sharded_forward(self, x, p)
        for name, t in (("lora_A", self.lora_A.weight), ("lora_B", self.lora_B.weight)):
            if type(t) is not torch.Tensor and type(t) is not nn.Parameter or t.dim() != 2:
                raise ValueError(f"{name}: its weight is a {type(t).__name__} of shape {tuple(t.shape)}: a sharding "
                                 f"wrapper (FSDP) wrapped lora_A / lora_B as units of their own, so they are not "
                                 f"gathered when this layer runs. Shard the LoRALinear (or the block holding it) as "
                                 f"one unit: FSDP1 auto_wrap_policy=posttrain_kernels.fsdp_auto_wrap_policy(model) "
                                 f"with use_orig_params=True, FSDP2 fully_shard per block (docs/peft.md)")
        return lora_linear(x, self.weight_nk, self.lora_A.weight, self.lora_B.weight, self.scaling,
                           self.bias, p)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, "
                f"bias={self.bias is not None}, merged={self.merged}")


class QLoRALinear(QuantizedBase, LoRALinear):
    """``LoRALinear`` over a quantized frozen base (QLoRA): bitsandbytes' ``Linear4bit`` or a
    ``QuantLinear``, kept as ``base_layer`` (its state-dict entries its own). The forward computes
    in the base's compute dtype, the 4-bit weight decoded inside the fused kernels. Made by
    ``LoRALinear.from_linear`` (and so by ``apply_lora`` / ``load_adapter``) for such a base.
    ``merge()`` is refused (the sum is not 4-bit); ``merged_linear()`` is a dense merged copy."""

    def merged_linear(self) -> nn.Linear:
        """An ``nn.Linear`` (the base's dtype) holding base + s·B·A, and the bias: for export."""
        w = self.dense_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device,
                           dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_((w.float() + self.delta_weight()).to(w.dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)


def _unmerged_weight_in_state(module: LoRALinear, state_dict, prefix, local_metadata):
    if module.merged and prefix + "weight" in state_dict:
        with torch.no_grad():
            w = module.weight
            state_dict[prefix + "weight"] = (w.float() - module.delta_weight()).to(w.dtype)
    return state_dict


def _merge_again_after_load(module: LoRALinear, incompatible_keys):
    if module.merged:  # the state holds the unmerged weight: fold the (loaded) adapter in again
        module.merged = False
        module.merge()
