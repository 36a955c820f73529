"""LoRA on the experts of the MoE layers (``add_expert_lora``): both routers,
both expert-GEMM layouts, the Triton kernels (interpreter) against the
reference backend, merge/unmerge, rank patterns, frozen experts, upcycled
and converted layers. Expert parallelism with LoRA'd experts runs in
tests/test_expert_parallel.py, PEFT models in tests/test_peft_experts.py."""
import copy

import pytest
import torch

import posttrain_kernels as pk

LAYERS = {
    "topk-gated": lambda gemm: pk.TopKMoE(32, 48, 4, top_k=2, capacity_factor=1.0, expert_gemm=gemm),
    "ec-plain-bias": lambda gemm: pk.ExpertChoiceMoE(32, 48, 4, capacity_factor=1.5, bias=True, expert_gemm=gemm),
}


def _lora(layer, **kw):
    layer.add_expert_lora(8, 16, **kw)
    with torch.no_grad():  # B starts at zero (PEFT's init): move it so the adapters matter
        for adapter in layer.experts.lora.values():
            adapter.lora_B.normal_()
    return layer


def _run(layer, x, cot):
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    (y * cot).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("gemm", ["padded", "grouped"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_kernels_match_the_reference_backend(name, gemm):
    torch.manual_seed(0)
    layer = _lora(LAYERS[name](gemm), rank_pattern={1: 4, 3: 0}, alpha_pattern={2: 4.0})
    x, cot = torch.randn(2, 13, 32), torch.randn(2, 13, 32)
    layer.backend = "triton"
    y, dx, g = _run(layer, x, cot)
    ref = copy.deepcopy(layer)
    ref.backend = "reference"
    ref.zero_grad()
    y2, dx2, g2 = _run(ref, x, cot)
    torch.testing.assert_close(y, y2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dx, dx2, rtol=1e-4, atol=1e-4)
    assert set(g) == set(g2) and {n for n in g if ".lora." in n} == {
        f"experts.lora.{t}.lora_{m}" for t in ("gate_up", "down") for m in "AB"}
    for n in g:
        torch.testing.assert_close(g[n], g2[n], rtol=1e-4, atol=1e-4 * max(1.0, g2[n].abs().max().item()))
    # rank 0 switches expert 3's adapter off: no gradient reaches it
    for t in ("gate_up", "down"):
        assert g[f"experts.lora.{t}.lora_A"][3].abs().sum() == 0 and g[f"experts.lora.{t}.lora_B"][3].abs().sum() == 0


@pytest.mark.parametrize("gemm", ["padded", "grouped"])
def test_merge_and_unmerge(gemm):
    torch.manual_seed(1)
    layer = _lora(LAYERS["topk-gated"](gemm), targets=("gate_up", "down"), rank_pattern={0: 2})
    layer.backend = "triton"
    x = torch.randn(17, 32)
    with torch.no_grad():
        y = layer(x)
        before = {n: p.clone() for n, p in layer.experts.named_parameters(recurse=False)}
        layer.merge_expert_lora()
        torch.testing.assert_close(layer(x), y, rtol=1e-4, atol=1e-4)
        layer.unmerge_expert_lora()
        for n, p in layer.experts.named_parameters(recurse=False):
            torch.testing.assert_close(p, before[n], rtol=0, atol=1e-5)
        torch.testing.assert_close(layer(x), y, rtol=1e-4, atol=1e-4)


def test_experts_are_frozen_and_fresh_adapters_change_nothing():
    torch.manual_seed(2)
    layer = LAYERS["topk-gated"]("padded")
    x = torch.randn(9, 32)
    with torch.no_grad():
        y0 = layer(x)
    layer.add_expert_lora(4, 8, targets="down")
    assert not any(p.requires_grad for p in layer.experts.parameters(recurse=False))
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == [
        "router.weight", "experts.lora.down.lora_A", "experts.lora.down.lora_B"]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y0)  # B = 0


def test_upcycled_mlp_with_expert_lora_still_equals_the_mlp():
    """The upcycling invariant (C = E: every expert takes every token) holds with fresh adapters."""
    torch.manual_seed(3)
    mlp = torch.nn.Module()
    mlp.fc1, mlp.act, mlp.fc2 = torch.nn.Linear(16, 24), torch.nn.GELU(), torch.nn.Linear(24, 16)
    mlp.forward = lambda h: mlp.fc2(mlp.act(mlp.fc1(h)))
    moe = pk.upcycle_mlp(mlp, num_experts=4, capacity_factor=4.0)
    moe.add_expert_lora(4, 4)
    moe.backend = "triton"
    x = torch.randn(11, 16)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), mlp(x), rtol=1e-5, atol=1e-5)


def test_lora_on_a_converted_hf_block():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3MoeConfig(hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                                      num_experts=4, num_experts_per_tok=2, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=16)
    torch.manual_seed(4)
    block = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(cfg)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.1)
    layer = pk.TopKMoE.from_hf(block)
    _lora(layer)
    layer.backend = "triton"
    x = torch.randn(1, 7, 32)
    y, dx, g = _run(layer, x, torch.randn(1, 7, 32))
    assert torch.isfinite(y).all() and all(torch.isfinite(v).all() for v in g.values())


@pytest.mark.parametrize("kw, name", [
    (dict(r=0, alpha=1), "r"), (dict(r=4, alpha=float("nan")), "alpha"), (dict(r=4, alpha=1, targets=("qkv",)), "targets"),
    (dict(r=4, alpha=1, dropout=1.0), "dropout"), (dict(r=4, alpha=1, rank_pattern={9: 2}), "rank_pattern"),
    (dict(r=4, alpha=1, alpha_pattern={0: float("inf")}), "alpha_pattern"),
])
def test_bad_arguments(kw, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        LAYERS["topk-gated"]("padded").add_expert_lora(**kw)


def test_disable_adapter_and_merge_and_unload_cover_expert_adapters():
    torch.manual_seed(5)
    model = torch.nn.Sequential(LAYERS["topk-gated"]("padded"))
    x = torch.randn(9, 32)
    with torch.no_grad():
        base = model(x)
        _lora(model[0])
        model[0].backend = "triton"
        adapted = model(x)
        assert not torch.allclose(adapted, base)
        for merged in (False, True):
            if merged:
                model[0].merge_expert_lora()
            with pk.disable_adapter(model):
                torch.testing.assert_close(model(x), base, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(model(x), adapted, rtol=1e-4, atol=1e-4)
        pk.merge_and_unload(model)
        assert len(model[0].experts.lora) == 0 and not model[0].experts.lora_merged
        torch.testing.assert_close(model(x), adapted, rtol=1e-4, atol=1e-4)
