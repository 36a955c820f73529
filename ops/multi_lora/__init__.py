"""Batched multi-adapter LoRA: one forward over a batch whose rows use different adapters.

Adapters live in a stacked pool: ``lora_a [SLOTS, R_MAX, K]``,
``lora_b [SLOTS, N, R_MAX]``, ``ranks [SLOTS]`` (int32; 0 = empty slot) and
``scales [SLOTS]`` (fp32). ``adapter_ids [M]`` picks a slot per token, -1 for
the base model alone. Rows are grouped by adapter on the device (a stable
sort), then two kernels run: the shrink and the base GEMM with every
adapter's expand fused into its accumulator. No host synchronisation: the
whole forward can be captured in a CUDA graph.

Backward (multi-adapter training): dt = dY·B_a (the shrink kernel on dY),
dx = dY·W0 + s·dt·A_a (the fused matmul kernel, transposed operands), and
dA / dB by one small GEMM per adapter over its sorted rows: deterministic,
no atomics, no host sync. The base weight gets no gradient.

launch.py     RowOrder / AdapterStack / SlotMatrix and the launchers (the only importer of kernels/ and autotune/)
reference.py  a per-row loop over adapters, and the ops in plain PyTorch
op.py         torch.library ops posttrain_kernels::multi_lora_fwd / multi_lora_bwd (multi_qlora_*: a quantized weight)
function.py   MultiLoRALinearFunction and multi_lora_linear (argument checks)
layer.py      MultiLoRALinear, the slot-holding nn.Linear; QMultiLoRALinear over a quantized base
"""
from .function import MultiLoRALinearFunction, multi_lora_linear  # noqa: F401
from .layer import MultiLoRALinear, QMultiLoRALinear  # noqa: F401
