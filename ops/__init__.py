"""Launchers, torch.library ops, autograd Functions, functionals, layers, references."""
from .backend import use_triton  # noqa: F401
from .layers import LoRALinear  # noqa: F401
from .lora import LoRALinearFunction, lora_linear  # noqa: F401
