"""posttrain-kernels: hand-written Triton kernels for post-training.

Public API:

* ``lora_linear(x, weight, lora_a, lora_b, scale, bias=None, dropout_p=0.0)``:
  fused LoRA linear, forward and backward.
* ``LoRALinear``: drop-in ``nn.Linear`` with a LoRA adapter (merge/unmerge,
  PEFT-compatible parameter names).
* ``LoRALinearFunction``: the autograd Function under ``lora_linear``.
"""
from .ops.layers import LoRALinear
from .ops.lora import LoRALinearFunction, lora_linear

__version__ = "0.1.0"
__all__ = ["LoRALinear", "LoRALinearFunction", "lora_linear", "__version__"]
