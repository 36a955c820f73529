"""Everything above the kernels, one package per feature, each with the same shape.

    lora/        fused LoRA linear
    multi_lora/  batched multi-adapter LoRA
    moe/         MoE routing, dispatch/combine, layers, upcycling
    adapters/    PEFT integration: adapter files, apply/save/load, the adapter pool
    quant/       quantized frozen bases: 4-bit storage (bitsandbytes' layout), its decode, its layers

A feature package holds ``launch.py`` (launchers: the only importer of
``kernels/`` and ``autotune/``), ``reference.py`` (the same ops in plain
PyTorch), ``op.py`` (the ``torch.library`` ops, flat schemas),
``function.py`` (autograd Functions, functionals and their argument checks)
and its ``nn.Module`` layers. Shared: ``backend.py`` (which implementation
runs), ``common.py`` (checks, LoRA scale, rank cap, the frozen-Linear base),
``dropout.py`` (the kernels' dropout hash in PyTorch).
"""
if __name__ != "posttrain_kernels.ops":  # the checkout's folder imported by its bare name: ../_unshadow.py
    import os as _os
    import runpy as _runpy
    _runpy.run_path(_os.path.join(_os.path.dirname(__file__), _os.pardir, "_unshadow.py"))["resolve"](__name__, __file__)
else:
    from .backend import use_triton  # noqa: F401
