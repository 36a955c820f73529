"""@triton.jit kernels only: no tensor allocation, no torch.nn.

Launchers live in ``posttrain_kernels.ops``; config spaces in
``posttrain_kernels.autotune``.
"""
if __name__ != "posttrain_kernels.kernels":  # the checkout's folder imported by its bare name: ../_unshadow.py
    import os as _os
    import runpy as _runpy
    _runpy.run_path(_os.path.join(_os.path.dirname(__file__), _os.pardir, "_unshadow.py"))["resolve"](__name__, __file__)
