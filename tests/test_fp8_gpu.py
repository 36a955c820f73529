"""GPU tests of LoRA over an fp8 base, bf16 activations: the activation quantisation bit for bit
PyTorch's cast, the decode exact, the fused LoRA through the fp8 tensor-core GEMM (TMA on sm_90)
at a training shape and through the in-loop decode at a decode shape, forward and every gradient
against the fp32 formula (the tensor-core path over the activations as it quantises them), and a
CUDA graph of the tensor-core forward."""
import math

import pytest
import torch
from helpers import GPU, assert_close_rule, assert_same_in_a_cuda_graph
from test_fp8 import fp8, x_hat

import posttrain_kernels as pk
from posttrain_kernels.ops.quant.fp8 import dequantize_fp8
from posttrain_kernels.ops.quant.launch import dequantize_triton, fp8_quantize_act

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("nan_poison")]


def test_activation_quantisation_and_decode_bf16():
    x = torch.randn(512, 4096, device=GPU).bfloat16() * 3
    xq, sx, _ = fp8_quantize_act(x)
    blocks = x.float().reshape(512, 32, 128)
    s = blocks.abs().amax(-1).clamp(min=0) / 448
    s = torch.where(s > 0, s, torch.ones_like(s))
    want = (blocks / s[..., None]).clamp(-448, 448).to(torch.float8_e4m3fn).reshape(512, 4096)
    assert torch.equal(sx, s) and torch.equal(xq.view(torch.uint8), want.view(torch.uint8))
    for scaling in ("row", "block"):
        w = fp8(1000, 4096, scaling, torch.bfloat16, GPU)
        assert torch.equal(dequantize_triton(w, torch.bfloat16), dequantize_fp8(w))


@pytest.mark.parametrize("scaling", ["row", "block"])
@pytest.mark.parametrize("M", [16, 4096], ids=["decode-inloop", "train-fp8-gemm"])
def test_lora_over_fp8_bf16(M, scaling):
    K, N, r = 4096, 4096, 16
    g = torch.Generator(device=GPU).manual_seed(0)
    w = fp8(N, K, scaling, torch.bfloat16, GPU)
    dense = dequantize_fp8(w, torch.float32)
    x = torch.randn(M, K, generator=g, device=GPU).bfloat16()
    a = torch.randn(r, K, generator=g, device=GPU) / math.sqrt(K)
    b = torch.randn(N, r, generator=g, device=GPU) / math.sqrt(r)
    dy = torch.randn(M, N, generator=g, device=GPU).bfloat16()
    leaves = [v.clone().requires_grad_(True) for v in (x, a, b)]
    y = pk.lora_linear(leaves[0], w, leaves[1], leaves[2], 2.0)
    y.backward(dy)
    mma = M > 256
    bx = x_hat(x).float() if mma else x.float()
    bdy = x_hat(dy, w.scale if scaling == "row" else None).float() if mma else dy.float()
    w_dy = w.data.float() if mma and scaling == "row" else dense
    t = x.float() @ a.t()
    want = {"y": bx @ dense.t() + 2.0 * t @ b.t(), "dx": bdy @ w_dy + 2.0 * (dy.float() @ b) @ a,
            "dA": 2.0 * (dy.float() @ b).t() @ x.float(), "dB": 2.0 * dy.float().t() @ t}
    got = {"y": y, "dx": leaves[0].grad, "dA": leaves[1].grad, "dB": leaves[2].grad}
    for name, ref in want.items():
        assert_close_rule(name, got[name].float(), ref.bfloat16() if name in ("y", "dx") else ref.half(),
                          ref.double(), 1e-2)


def test_fp8_gemm_forward_in_a_cuda_graph():
    w = fp8(4096, 4096, "block", torch.bfloat16, GPU)
    x = torch.randn(1024, 4096, device=GPU).bfloat16()
    a, b = torch.randn(16, 4096, device=GPU) * 0.01, torch.randn(4096, 16, device=GPU) * 0.01
    assert_same_in_a_cuda_graph(lambda: pk.lora_linear(x, w, a, b, 2.0))
