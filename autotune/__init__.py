"""Kernel specs, config spaces, the persistent per-GPU tuning cache, the
ahead-of-time compile and the ``tune`` command.

``REGISTRY`` maps each kernel's name to its ``KernelSpec`` (function, space,
prune rule, default pick, cache key, AOT variants); the feature modules
``lora``, ``multi_lora`` and ``moe`` register them on import.
"""
if __name__ != "posttrain_kernels.autotune":  # the checkout's folder imported by its bare name: ../_unshadow.py
    import os as _os
    import runpy as _runpy
    _runpy.run_path(_os.path.join(_os.path.dirname(__file__), _os.pardir, "_unshadow.py"))["resolve"](__name__, __file__)
else:
    from . import lora, moe, moe_lora, multi_lora, quant  # noqa: F401  (register every kernel's spec)
    from .config import MAX_RANK, Config, rank_block  # noqa: F401
    from .registry import REGISTRY, AotVariant, KernelSpec  # noqa: F401
