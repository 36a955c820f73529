"""Quantized frozen bases: the storage formats the quantized-base kernels read.

nf4.py  4-bit blocks in bitsandbytes' layout (NF4 / FP4, double-quantised scales): NF4Weight,
        quantize_nf4 (bitsandbytes' codes bit for bit), dequantize_nf4, from_bnb, check_nf4
"""
from .nf4 import NF4Weight, NestedStats, check_nf4, dequantize_nf4, from_bnb, quantize_nf4  # noqa: F401
