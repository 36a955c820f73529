"""PEFT integration: adapter files, single-adapter LoRA on a model, the adapter pool.

format.py  PEFT's adapter files and matching rules (target modules, rank/alpha patterns)
model.py   apply_lora / save_adapter / load_adapter / merge_and_unload / disable_adapter: LoRALinear on a model
pool.py    AdapterPool: MultiLoRALinear layers on a whole model, adapters loaded into slots
patch.py   patch_peft / unpatch_peft: PEFT's own LoRA layers run through the fused kernels
"""
from .model import (apply_lora, disable_adapter, fsdp_auto_wrap_policy, load_adapter, merge_and_unload,  # noqa: F401
                    save_adapter)
from .patch import patch_peft, unpatch_peft  # noqa: F401
from .pool import AdapterPool  # noqa: F401
