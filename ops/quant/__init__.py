"""Quantized frozen bases: the storage formats the quantized-base kernels read, and their layers.

nf4.py       4-bit blocks in bitsandbytes' layout (NF4 / FP4, double-quantised scales): NF4Weight,
             quantize_nf4 (bitsandbytes' codes bit for bit), dequantize_nf4, from_bnb, check_nf4
weight.py    what every format offers the ops: flat parts for the op boundary, dequantize, checks
launch.py    the 4-bit decode kernel's launcher, the multi-adapter 4-bit GEMM, where a GEMM decodes
function.py  dequantize_weight (the decode kernel where Triton runs), quant_linear
layer.py     QuantLinear / quantize_model (4-bit layers without bitsandbytes), the quantized-base
             mixin of the LoRA layers, quantized_weight (bitsandbytes' Linear4bit read as it is)

The fused LoRA ops take the weights themselves: ``lora_linear(x, nf4_weight, ...)``.
"""
from .function import dequantize_weight, quant_linear  # noqa: F401
from .nf4 import NF4Weight, NestedStats, check_nf4, dequantize_nf4, from_bnb, quantize_nf4  # noqa: F401
