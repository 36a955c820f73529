"""MoE layers and sparse upcycling: the upcycling invariant for GPT-2 and Llama
MLPs (tiny Hugging Face models built from configs, no download), the Mixtral
conversion, gradients of the input, the router and the expert weights through
a whole layer (kernels against the reference backend), torch.compile."""
import pytest
import torch

import posttrain_kernels as pk

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("router,kwargs", [
    ("expert_choice", dict(capacity_factor=4.0)),  # C = E: every expert takes every token
    ("topk", dict(top_k=2, capacity_factor=2.0)),  # capacity n: nothing dropped, gates renormalised
])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_upcycling_invariant(family, router, kwargs, device, tiny_llama, tiny_gpt2):
    torch.manual_seed(0)
    model = (tiny_gpt2() if family == "gpt2" else tiny_llama()).to(device)
    mlp = model.h[0].mlp if family == "gpt2" else model.model.layers[0].mlp
    moe = pk.upcycle_mlp(mlp, 4, router=router, **kwargs).eval()
    x = torch.randn(3, 5, 32, device=device)
    torch.testing.assert_close(moe(x), mlp(x), rtol=1e-5, atol=1e-5)
    assert moe.router.weight.dtype == torch.float32
    assert abs(moe.router.weight.std().item() - 0.02) < 0.01, "new router ~ N(0, 0.02)"


def test_upcycle_model_every_other_and_last(device, tiny_gpt2):
    torch.manual_seed(0)
    model = tiny_gpt2(n_layer=4).to(device)
    ids = torch.randint(0, 64, (2, 9), device=device)
    before = model(ids).last_hidden_state
    replaced = pk.upcycle_model(model, 4, layers="every_other", capacity_factor=4.0)
    assert replaced == [1, 3]
    assert [type(b.mlp).__name__ for b in model.h] == ["GPT2MLP", "ExpertChoiceMoE", "GPT2MLP", "ExpertChoiceMoE"]
    torch.testing.assert_close(model(ids).last_hidden_state, before, rtol=1e-4, atol=1e-4)
    assert pk.upcycle_model(tiny_gpt2(n_layer=4), 2, layers="last:1") == [3]
    with pytest.raises(ValueError, match="^layers"):
        pk.upcycle_model(tiny_gpt2(), 2, layers="first:2")


@pytest.mark.parametrize("gated", [False, True], ids=["t5", "t5-v1.1-gated"])
def test_upcycle_t5(gated):
    """T5's feed-forward (wi / wo, or gated wi_0 / wi_1 / wo) upcycles with
    its dropout between the GEMMs; upcycle_model finds the feed-forward layers
    of the encoder and the decoder, and the logits stay the same."""
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=48, num_layers=2, num_decoder_layers=2,
                                num_heads=2, dropout_rate=0.3, feed_forward_proj="gated-gelu" if gated else "relu",
                                decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    mlp = model.encoder.block[0].layer[-1].DenseReluDense
    moe = pk.upcycle_mlp(mlp, 4, capacity_factor=4.0).eval()
    assert moe.experts.gated == gated and moe.experts.dropout_position == "hidden" and moe.experts.dropout.p == 0.3
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(moe(x), mlp(x), rtol=1e-5, atol=1e-5)
    ids = torch.randint(3, 64, (2, 7))
    with torch.no_grad():
        want = model(input_ids=ids, decoder_input_ids=ids).logits
    assert pk.upcycle_model(model, 4, layers="every_other", capacity_factor=4.0) == [1, 3]
    assert isinstance(model.decoder.block[1].layer[-1].DenseReluDense, pk.ExpertChoiceMoE)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, decoder_input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)


def test_fc1_fc2_dropout_between_the_gemms():
    """An fc1 / act / dropout / fc2 MLP: the upcycled experts drop activations
    (hidden), not outputs: with every activation dropped, what remains is
    fc2's bias (dropping outputs would leave 0)."""
    class Mlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(16, 24), torch.nn.Linear(24, 16)
            self.act, self.dropout = torch.nn.GELU(), torch.nn.Dropout(0.5)

        def forward(self, x):
            return self.fc2(self.dropout(self.act(self.fc1(x))))

    mlp = Mlp()
    moe = pk.upcycle_mlp(mlp, 2, capacity_factor=2.0)
    assert moe.experts.dropout_position == "hidden" and moe.training
    moe.experts.dropout = torch.nn.Dropout(1.0)
    x = torch.randn(6, 16)
    torch.testing.assert_close(moe(x), mlp.fc2.bias.expand(6, 16), rtol=1e-5, atol=1e-5)


def test_mixtral_block_conversion(device):
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1, vocab_size=64, num_local_experts=4, num_experts_per_tok=2,
                                     bos_token_id=0, eos_token_id=0)
    block = transformers.MixtralForCausalLM(cfg).model.layers[0].mlp.to(device).eval()
    for p in block.parameters():  # the default init of some versions leaves experts at zero
        torch.nn.init.normal_(p, std=0.2)
    layer = pk.TopKMoE.from_mixtral(block)
    x = torch.randn(2, 7, 32, device=device)
    want = block(x)
    want = want[0] if isinstance(want, tuple) else want
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls,kwargs", [
    (pk.ExpertChoiceMoE, dict(capacity_factor=2.0, gated=False)),
    (pk.TopKMoE, dict(top_k=2, capacity_factor=1.0, gated=True)),  # with drops
    (pk.TopKMoE, dict(top_k=1, capacity_factor=0.75, gated=False, normalize=False, drop_order="probability")),
    (pk.ExpertChoiceMoE, dict(capacity_factor=1.0, gated=True, group_size=8)),
])
def test_layer_gradients_match_reference_backend(cls, kwargs, device, monkeypatch):
    torch.manual_seed(0)
    layer = cls(24, 40, 4, **kwargs).to(device)
    x = torch.randn(2, 16, 24, device=device, requires_grad=True)
    dy = torch.randn(2, 16, 24, device=device)

    def run():
        layer.zero_grad()
        xx = x.detach().clone().requires_grad_(True)
        y = layer(xx)
        y.backward(dy)
        return [y.detach(), xx.grad] + [p.grad.clone() for p in layer.parameters()]

    ours = run()
    monkeypatch.setenv("POSTTRAIN_KERNELS_BACKEND", "reference")
    want = run()
    names = ["y", "dx"] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, ours, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert torch.count_nonzero(layer.router.weight.grad) > 0, "the router must get a gradient through the gates"
    assert set(layer.aux_losses) >= {"z_loss"}


def test_layer_errors_and_compile(device):
    with pytest.raises(ValueError, match="^num_experts"):
        pk.ExpertChoiceMoE(8, 16, 0)
    with pytest.raises(ValueError, match="^top_k"):
        pk.TopKMoE(8, 16, 2, top_k=3)
    with pytest.raises(ValueError, match="^activation"):
        pk.ExpertChoiceMoE(8, 16, 2, activation="swish-ish")
    layer = pk.TopKMoE(16, 32, 4, top_k=2).to(device)
    with pytest.raises(ValueError, match="^x: "):
        layer(torch.randn(3, 8, device=device))
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 6, 16, device=device, requires_grad=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)
    compiled(x).sum().backward()
    assert torch.isfinite(x.grad).all()
