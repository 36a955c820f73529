"""posttrain-kernels: hand-written Triton kernels for post-training.

Public API:

* ``lora_linear(x, weight, lora_a, lora_b, scale, bias=None, dropout_p=0.0)``:
  fused LoRA linear, forward and backward.
* ``LoRALinear``: drop-in ``nn.Linear`` with a LoRA adapter (merge/unmerge,
  PEFT-compatible parameter names).
* ``LoRALinearFunction``: the autograd Function under ``lora_linear``.
* ``apply_lora`` / ``save_adapter`` / ``load_adapter`` / ``merge_and_unload``
  / ``disable_adapter``: LoRA on a whole model, in PEFT's adapter file format.
* ``patch_peft`` / ``unpatch_peft``: PEFT's own LoRA layers (a ``PeftModel``)
  run through the fused kernels, one line.
* ``multi_lora_linear``, ``MultiLoRALinearFunction``, ``MultiLoRALinear``,
  ``AdapterPool``: one forward over a batch whose rows use different
  adapters, and training several adapters in one mixed batch.
* MoE: ``expert_choice_route``, ``topk_route``, ``moe_dispatch``,
  ``moe_combine``, the layers ``ExpertChoiceMoE`` and ``TopKMoE``, and sparse
  upcycling with ``upcycle_mlp`` / ``upcycle_model``; expert parallelism with
  ``layer.shard_experts(group)`` and ``expert_parallel_parameter_names``.
* Quantized frozen bases (QLoRA, fp8): ``lora_linear`` / ``multi_lora_linear``
  take an ``NF4Weight`` (bitsandbytes' 4-bit storage, decoded inside the
  kernels) or an ``FP8Weight`` (e4m3, per-row or tile scales; the fp8 tensor
  cores at training sizes); ``LoRALinear.from_linear`` / ``apply_lora`` /
  ``AdapterPool`` / ``patch_peft`` accept bitsandbytes' ``Linear4bit`` and
  transformers' ``FP8Linear`` (``QLoRALinear``, ``QMultiLoRALinear``);
  ``quantize_nf4`` (bitsandbytes' codes bit for bit), ``dequantize_nf4``,
  ``from_bnb``, ``quantize_fp8``, ``dequantize_fp8``, ``from_hf_fp8``,
  ``QuantLinear`` / ``quantize_model`` (quantized layers without either
  library), ``dequantize_weight``.
* LoRA on MoE experts: ``layer.add_expert_lora(...)``, ``expert_lora_linear``
  (each expert's GEMM with its adapter fused in, forward and backward),
  ``ExpertLoRAFunction``, ``expert_lora_mixed`` (a mixed batch of expert
  adapters, inference), ``peft_expert_factors`` (PEFT's flattened layout as
  views); PEFT's ``target_parameters`` models through ``patch_peft``.
"""
from .ops.adapters import (AdapterPool, apply_lora, disable_adapter, fsdp_auto_wrap_policy, load_adapter,
                          merge_and_unload, patch_peft, save_adapter, unpatch_peft)
from .ops.lora import (LoRAColwiseParallel, LoRALinear, LoRALinearFunction, LoRARowwiseParallel, QLoRALinear,
                       lora_linear)
from .ops.moe import (ExpertChoiceMoE, ExpertLoRAFunction, MoECombineFunction, MoEDispatchFunction, TopKMoE, capacity_from_factor,
                      convert_moe, expert_choice_route, expert_parallel_parameter_names, load_balancing_loss,
                      expert_lora_linear, expert_lora_mixed, moe_combine, moe_dispatch, peft_expert_factors,
                      router_z_loss, select_experts, topk_route, upcycle_mlp, upcycle_model)
from .ops.multi_lora import MultiLoRALinear, MultiLoRALinearFunction, QMultiLoRALinear, multi_lora_linear
from .ops.quant import NF4Weight, dequantize_nf4, dequantize_weight, from_bnb, quantize_nf4
from .ops.quant.fp8 import FP8Weight, dequantize_fp8, from_hf_fp8, quantize_fp8
from .ops.quant.layer import QuantLinear, quantize_model

__version__ = "0.1.0"
__all__ = [
    # fused LoRA
    "LoRALinear", "LoRALinearFunction", "lora_linear", "LoRAColwiseParallel", "LoRARowwiseParallel",
    # PEFT integration
    "apply_lora", "save_adapter", "load_adapter", "merge_and_unload", "disable_adapter", "fsdp_auto_wrap_policy",
    "patch_peft", "unpatch_peft",
    # multi-adapter LoRA
    "multi_lora_linear", "MultiLoRALinearFunction", "MultiLoRALinear", "AdapterPool",
    # MoE
    "expert_choice_route", "topk_route", "select_experts", "capacity_from_factor", "router_z_loss",
    "load_balancing_loss", "moe_dispatch", "moe_combine", "MoEDispatchFunction", "MoECombineFunction",
    "ExpertChoiceMoE", "TopKMoE", "convert_moe", "upcycle_mlp", "upcycle_model", "expert_parallel_parameter_names",
    # quantized frozen bases
    "NF4Weight", "quantize_nf4", "dequantize_nf4", "from_bnb", "QuantLinear", "quantize_model", "dequantize_weight",
    "FP8Weight", "quantize_fp8", "dequantize_fp8", "from_hf_fp8",
    "QLoRALinear", "QMultiLoRALinear",
    # LoRA on MoE experts
    "expert_lora_linear", "ExpertLoRAFunction", "expert_lora_mixed", "peft_expert_factors",
    "__version__",
]
