"""MoE: expert-choice and top-K capacity routing, deterministic dispatch/combine, layers, sparse upcycling.

routing.py    expert_choice_route, topk_route, capacities, router losses (plain PyTorch)
launch.py     gather / segment-sum launchers (the only importer of kernels/ and autotune/)
reference.py  the ops in plain PyTorch, and the one-hot formulation
op.py         torch.library ops posttrain_kernels::moe_dispatch / moe_segment_sum / moe_combine_bwd
function.py   MoEDispatchFunction, MoECombineFunction, moe_dispatch, moe_combine (argument checks)
layer.py      Experts, ExpertChoiceMoE, TopKMoE (router families, shared experts, per-sequence groups)
hf.py         from_hf / convert_moe: Hugging Face MoE blocks as TopKMoE layers
upcycle.py    upcycle_mlp, upcycle_model
parallel.py   expert parallelism: experts sharded over a process group, tokens exchanged with all_to_all
lora.py       expert_lora_linear / expert_lora_mixed: LoRA fused into the expert GEMMs (ops, autograd, checks)
lora_launch.py  its launchers (kernels/moe_lora.py; the multi-LoRA shrink and gradient kernels)
hf_experts.py transformers' fused-experts modules through expert_lora_linear (patch_peft's ParamWrapper path)
"""
from .function import MoECombineFunction, MoEDispatchFunction, moe_combine, moe_dispatch  # noqa: F401
from .hf import convert_moe, from_hf  # noqa: F401
from .layer import ClampedSwiGLU, ExpertChoiceMoE, ExpertLoRA, Experts, SharedExpert, TopKMoE  # noqa: F401
from .lora import ExpertLoRAFunction, expert_lora_linear, expert_lora_mixed, peft_expert_factors  # noqa: F401
from .routing import (capacity_from_factor, expert_choice_route, load_balancing_loss, router_z_loss,  # noqa: F401
                      select_experts, topk_route)
from .parallel import expert_parallel_parameter_names  # noqa: F401
from .upcycle import upcycle_mlp, upcycle_model  # noqa: F401
