"""MoE layers and routing as training scripts use them: non-finite router logits, a layer
converted with .half() / .to(bfloat16), and copy.deepcopy after a grad-enabled forward."""
import copy

import pytest
import torch

import posttrain_kernels as pk

pytestmark = pytest.mark.usefixtures("nan_poison")


@pytest.mark.parametrize("bad", ["nan", "+inf", "all-inf"])
def test_a_non_finite_token_displaces_no_finite_one(bad):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 4, generator=g)
    logits[3] = {"nan": float("nan"), "+inf": float("inf"), "all-inf": float("-inf")}[bad]
    if bad == "+inf":
        logits[3, 1:] = 0.5  # one +inf among finite logits
    gates, idx = pk.expert_choice_route(logits, capacity=5)
    probs = torch.softmax(logits, -1)
    finite = [i for i in range(12) if i != 3]
    for e in range(4):
        order = sorted(finite, key=lambda i: (-probs[i, e].item(), i))[:5]
        assert idx[e].tolist() == order, f"expert {e}: {idx[e].tolist()} != {order}"
        torch.testing.assert_close(gates[e], probs[order, e], rtol=0, atol=0)
    # more slots than finite tokens: the bad token comes last, its NaN gate in its own slot
    gates, idx = pk.expert_choice_route(logits, capacity=12)
    assert (idx[:, -1] == 3).all() and torch.isfinite(gates[:, :-1]).all()


def test_a_nan_input_leaves_other_tokens_outputs_unchanged(device):
    torch.manual_seed(0)
    layer = pk.ExpertChoiceMoE(16, 24, 4, capacity=4, device=device).eval()
    x = torch.randn(12, 16, device=device)
    dirty = x.clone()
    dirty[3] = float("nan")
    with torch.no_grad():
        got = layer(dirty)
        want = layer(torch.cat([x[:3], x[4:]]))  # the same tokens without the bad one, same capacity
    torch.testing.assert_close(torch.cat([got[:3], got[4:]]), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("convert,backend", [("half", None), ("bfloat16", "reference")])
@pytest.mark.parametrize("cls,kw", [(pk.ExpertChoiceMoE, {}), (pk.TopKMoE, {"top_k": 2})], ids=["EC", "top2"])
def test_converted_layer_runs_with_an_fp32_router(cls, kw, convert, backend, device):
    """.half() / .to(bfloat16) convert the router's weights too; the router still computes in fp32."""
    torch.manual_seed(0)
    dtype = torch.float16 if convert == "half" else torch.bfloat16
    layer = cls(16, 24, 4, backend=backend, device=device, **kw).eval()
    converted = copy.deepcopy(layer)
    converted = converted.half() if convert == "half" else converted.to(dtype)
    assert converted.router.weight.dtype == dtype
    ref = copy.deepcopy(converted)
    ref.router.float()  # the same (rounded) router values, stored in fp32
    x = torch.randn(2, 6, 16, device=device).to(dtype)
    with torch.no_grad():
        got, want = converted(x), ref(x)
    assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("cls,kw", [(pk.ExpertChoiceMoE, {}), (pk.TopKMoE, {"top_k": 2})], ids=["EC", "top2"])
def test_deepcopy_after_a_grad_enabled_forward(cls, kw, device):
    layer = cls(16, 24, 4, device=device, **kw)
    x = torch.randn(10, 16, device=device, requires_grad=True)
    layer(x).sum().backward()
    assert any(v.grad_fn is not None for v in layer.aux_losses.values() if isinstance(v, torch.Tensor))
    twin = copy.deepcopy(layer)
    for k, v in layer.aux_losses.items():
        assert torch.equal(twin.aux_losses[k], v.detach())
    with torch.no_grad():
        torch.testing.assert_close(twin(x), layer(x), rtol=0, atol=0)
