"""PEFT integration: adapter files, single-adapter LoRA on a model, the adapter pool.

format.py  PEFT's adapter files and matching rules (target modules, rank/alpha patterns)
model.py   apply_lora / save_adapter / load_adapter: LoRALinear layers on a whole model
pool.py    AdapterPool: MultiLoRALinear layers on a whole model, adapters loaded into slots
"""
from .model import apply_lora, load_adapter, save_adapter  # noqa: F401
from .pool import AdapterPool  # noqa: F401
