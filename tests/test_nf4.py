"""The 4-bit storage of quantized bases (ops/quant/nf4.py) against bitsandbytes
itself on the CPU: our quantiser's codes and scales bit for bit, bitsandbytes'
own Linear4bit weights (every quant_storage, with and without double
quantisation, nf4 and fp4) read as they are and dequantised exactly, and bad
storage refused with the field named."""
import dataclasses

import pytest
import torch

from posttrain_kernels.ops.quant import NF4Weight, check_nf4, dequantize_nf4, from_bnb, quantize_nf4

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional


def _bnb_dequantize(q, st):
    """bitsandbytes' dequantisation of the flat block layout its quantiser writes. Its CPU C++
    kernel (taken when in_features is even) indexes the blocks per row, which differs from that
    layout when in_features is not a multiple of the blocksize (seen with 0.50.2: an error as
    large as the weights); bitsandbytes' generic implementation follows the layout, so the
    comparison uses it there."""
    if st.shape[-1] % st.blocksize == 0:
        return F.dequantize_4bit(q, st)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code
    return _dequantize_4bit_compute(q.reshape(-1), st.absmax, _get_4bit_code(st.quant_type, q.device), st.blocksize,
                                    st.shape, st.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape, blocksize", [((24, 64), 64), ((7, 100), 64), ((33, 40), 128), ((5, 96), 256)],
                         ids=["even", "tail-block", "128", "256"])
def test_quantize_is_bitsandbytes_bit_for_bit(dtype, quant_type, shape, blocksize):
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 0.05).to(dtype)
    w[0, 0] = 0.0  # exact zeros and a block maximum on a level
    ours = quantize_nf4(w, blocksize, quant_type)
    q, st = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
    assert torch.equal(ours.packed, q.reshape(-1))
    assert torch.equal(ours.absmax, st.absmax)
    assert torch.equal(ours.code, st.code.float())
    assert torch.equal(dequantize_nf4(ours), _bnb_dequantize(q, st))


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_linear4bit_read_as_it_is(compress, storage, quant_type):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 40, bias=False)
    q = bnb.nn.Linear4bit(128, 40, bias=False, compute_dtype=torch.float32, compress_statistics=compress,
                          quant_type=quant_type, quant_storage=storage)
    q.load_state_dict(lin.state_dict())
    q = q.to("cpu")  # bitsandbytes quantises on the move to a device
    w = from_bnb(q)
    assert w.packed.data_ptr() == q.weight.data.data_ptr(), "the codes are read where bitsandbytes keeps them"
    assert (w.nested is not None) == compress
    want = F.dequantize_4bit(q.weight.data, q.weight.quant_state)
    assert torch.equal(dequantize_nf4(w, want.dtype), want)
    x = torch.randn(3, 128)
    torch.testing.assert_close(x @ dequantize_nf4(w, torch.float32).t(), q(x), rtol=1e-5, atol=1e-5)


def _good():
    return quantize_nf4(torch.randn(8, 64), 64)


@pytest.mark.parametrize("change, field", [
    (lambda w: dataclasses.replace(w, packed=w.packed[:-1]), "weight.packed"),
    (lambda w: dataclasses.replace(w, packed=w.packed.to(torch.int8)), "weight.packed"),
    (lambda w: dataclasses.replace(w, absmax=w.absmax[:-1]), "weight.absmax"),
    (lambda w: dataclasses.replace(w, absmax=w.absmax.half()), "weight.absmax"),
    (lambda w: dataclasses.replace(w, blocksize=48), "weight.blocksize"),
    (lambda w: dataclasses.replace(w, blocksize=128), "weight.absmax"),
    (lambda w: dataclasses.replace(w, shape=(8, 65)), "weight.packed"),
    (lambda w: dataclasses.replace(w, quant_type="int4"), "weight.quant_type"),
    (lambda w: dataclasses.replace(w, code=w.code[:8]), "weight.code"),
    (lambda w: dataclasses.replace(w, absmax=torch.where(torch.arange(8) == 3, float("nan"), w.absmax)),
     "weight.absmax"),
    (lambda w: dataclasses.replace(w, absmax=torch.where(torch.arange(8) == 0, float("inf"), w.absmax)),
     "weight.absmax"),
])
def test_bad_storage_names_the_field(change, field):
    check_nf4(_good())
    with pytest.raises(ValueError, match=f"^{field.replace('.', '[.]')}:"):
        check_nf4(change(_good()))


def test_quantize_refuses_non_finite_weights_and_bad_blocks():
    w = torch.randn(4, 64)
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match="^weight:"):
        quantize_nf4(w)
    with pytest.raises(ValueError, match="^blocksize:"):
        quantize_nf4(torch.randn(4, 64), 100)
    assert isinstance(quantize_nf4(torch.nn.Linear(64, 4)), NF4Weight)
