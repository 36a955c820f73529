"""Fused LoRA linear: ``y = x·W0ᵀ + s·(drop(x)·Aᵀ)·Bᵀ + bias``, forward and backward.

launch.py     launchers (the only importer of kernels/ and autotune/)
reference.py  the same ops in plain PyTorch
op.py         torch.library ops posttrain_kernels::lora_fwd / lora_bwd (qlora_fwd / _bwd: a quantized weight)
function.py   LoRALinearFunction and lora_linear (argument checks)
layer.py      LoRALinear, the drop-in nn.Linear; QLoRALinear over a quantized base
parallel.py   tensor parallelism: LoRAColwiseParallel / LoRARowwiseParallel for parallelize_module
"""
from .function import LoRALinearFunction, lora_linear  # noqa: F401
from .layer import LoRALinear, QLoRALinear, init_lora_  # noqa: F401
from .parallel import LoRAColwiseParallel, LoRARowwiseParallel  # noqa: F401
