"""@triton.jit kernels only: no tensor allocation, no torch.nn.

Launchers live in ``posttrain_kernels.ops``; config spaces in
``posttrain_kernels.autotune``.
"""
