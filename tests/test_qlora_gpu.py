"""GPU tests of LoRA over a 4-bit base, bf16: the decode kernel bit for bit against the reference
(double-quantised scales), the fused LoRA with the weight decoded in the main loop (decode-sized
M) and through a buffer (training-sized M) against the fp32 formula over the decoded weight, every
gradient, the multi-adapter forward at serving size, and CUDA-graph capture of the in-loop path."""
import math

import pytest
import torch
from helpers import GPU, assert_close_rule, assert_same_in_a_cuda_graph
from test_qlora import nf4

import posttrain_kernels as pk
from posttrain_kernels.ops.lora import reference as ref
from posttrain_kernels.ops.multi_lora.reference import multi_lora_fwd_ref
from posttrain_kernels.ops.quant import dequantize_nf4
from posttrain_kernels.ops.quant.launch import dequantize_triton

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("nan_poison")]


def test_decode_bf16_bit_for_bit():
    w = nf4(4096, 4096, 64, torch.bfloat16, nested=True, device=GPU)
    assert torch.equal(dequantize_triton(w, torch.bfloat16), dequantize_nf4(w))
    w = nf4(1000, 1000, 64, torch.float32, nested=True, device=GPU)  # rows straddle blocks: element-wise
    assert torch.equal(dequantize_triton(w, torch.bfloat16), dequantize_nf4(w).to(torch.bfloat16))


def _fwd_bwd(x, w, a, b, bias, dy, fn, cast=None):
    leaves = [v.detach().to(cast or v.dtype).requires_grad_(True) for v in (x, a, b)]
    y = fn(leaves[0], w if cast is None else w.to(cast), leaves[1], leaves[2], bias if cast is None else bias.to(cast))
    return [y.detach(), *torch.autograd.grad(y, leaves, dy.to(cast or dy.dtype))]


@pytest.mark.parametrize("M", [16, 200, 4096], ids=["decode-inloop", "inloop-128-rows", "train-buffer"])
def test_lora_over_nf4_bf16(M):
    K, N, r = 4096, 4096, 16
    g = torch.Generator(device=GPU).manual_seed(0)
    w = nf4(N, K, 64, torch.bfloat16, nested=True, device=GPU)
    dense = dequantize_nf4(w)
    x = torch.randn(M, K, generator=g, device=GPU).to(torch.bfloat16)
    a = torch.randn(r, K, generator=g, device=GPU) / math.sqrt(K)
    b = torch.randn(N, r, generator=g, device=GPU) / math.sqrt(r)
    bias = torch.randn(N, generator=g, device=GPU).to(torch.bfloat16)
    dy = torch.randn(M, N, generator=g, device=GPU).to(torch.bfloat16)
    ours = _fwd_bwd(x, w, a, b, bias, dy, lambda x_, w_, a_, b_, c_: pk.lora_linear(x_, w_, a_, b_, 2.0, c_))
    lowp = _fwd_bwd(x, dense, a.bfloat16(), b.bfloat16(), bias, dy,
                    lambda x_, w_, a_, b_, c_: ref.lora_linear_ref(x_, w_, a_, b_, 2.0, c_))
    hi = _fwd_bwd(x, dense, a, b, bias, dy, lambda x_, w_, a_, b_, c_: ref.lora_linear_ref(x_, w_, a_, b_, 2.0, c_),
                  cast=torch.float32)
    for name, o, lo, h in zip(("y", "dx", "dA", "dB"), ours, lowp, hi):
        assert_close_rule(name, o, lo, h, 1e-2)


def test_multi_lora_over_nf4_serving_bf16():
    M, K, N, S, r = 64, 4096, 4096, 64, 16
    g = torch.Generator(device=GPU).manual_seed(1)
    w = nf4(N, K, 64, torch.bfloat16, nested=True, device=GPU)
    A = (torch.randn(S, r, K, generator=g, device=GPU) / math.sqrt(K)).bfloat16()
    B = (torch.randn(S, N, r, generator=g, device=GPU) / math.sqrt(r)).bfloat16()
    ranks = torch.full((S,), r, dtype=torch.int32, device=GPU)
    scales = torch.full((S,), 2.0, device=GPU)
    ids = torch.randint(-1, S, (M,), generator=g, device=GPU)
    x = torch.randn(M, K, generator=g, device=GPU).bfloat16()
    y = pk.multi_lora_linear(x, w, A, B, ranks, scales, ids)
    dense = dequantize_nf4(w)
    hi = multi_lora_fwd_ref(x.float(), dense.float(), None, A.float(), B.float(), ranks, scales, ids)[0]
    lowp = pk.multi_lora_linear(x, dense, A, B, ranks, scales, ids)
    assert_close_rule("y", y, lowp, hi.double(), 1e-2)


def test_inloop_forward_in_a_cuda_graph():
    M, K, N, r = 16, 4096, 4096, 16
    w = nf4(N, K, 64, torch.bfloat16, nested=True, device=GPU)
    x = torch.randn(M, K, device=GPU).bfloat16()
    a, b = torch.randn(r, K, device=GPU) * 0.01, torch.randn(N, r, device=GPU) * 0.01
    assert_same_in_a_cuda_graph(lambda: pk.lora_linear(x, w, a, b, 2.0))
