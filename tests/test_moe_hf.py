"""Hugging Face MoE blocks as TopKMoE layers: for every family the installed
transformers has, a config-built tiny model (no download); the converted
block gives the block's output (fp32, nothing dropped), and convert_moe keeps
the model's logits and generate() tokens. Router options against a plain loop."""
import pytest
import torch

import posttrain_kernels as pk

transformers = pytest.importorskip("transformers")

COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _family(name):
    """(model, the first MoE block) of a tiny config-built model."""
    t = transformers
    if name == "mixtral":
        m = t.MixtralForCausalLM(t.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2))
    elif name == "qwen2_moe":
        m = t.Qwen2MoeForCausalLM(t.Qwen2MoeConfig(**COMMON, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                                   num_experts=6, num_experts_per_tok=2, norm_topk_prob=False))
    elif name == "qwen3_moe":
        m = t.Qwen3MoeForCausalLM(t.Qwen3MoeConfig(**COMMON, moe_intermediate_size=24, num_experts=6,
                                                   num_experts_per_tok=2, norm_topk_prob=True))
    elif name == "olmoe":
        m = t.OlmoeForCausalLM(t.OlmoeConfig(**COMMON, num_experts=6, num_experts_per_tok=2, norm_topk_prob=False))
    elif name == "jamba":  # attention in every layer: no Mamba kernels needed
        m = t.JambaForCausalLM(t.JambaConfig(**COMMON, num_experts=4, num_experts_per_tok=2, expert_layer_period=1,
                                             expert_layer_offset=0, attn_layer_period=1, attn_layer_offset=0,
                                             use_mamba_kernels=False))
    elif name == "granitemoe":
        m = t.GraniteMoeForCausalLM(t.GraniteMoeConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2))
    elif name == "dbrx":
        m = t.DbrxForCausalLM(t.DbrxConfig(d_model=32, n_heads=2, n_layers=2, vocab_size=64, pad_token_id=0,
                                           ffn_config=dict(ffn_hidden_size=24, moe_num_experts=4, moe_top_k=2,
                                                           moe_normalize_expert_weights=2.0),
                                           attn_config=dict(kv_n_heads=1, rope_theta=10000.0)))
    elif name == "ernie4_5_moe":
        m = t.Ernie4_5_MoeForCausalLM(t.Ernie4_5_MoeConfig(**COMMON, moe_intermediate_size=24, moe_k=2,
                                                           moe_num_experts=6, moe_num_shared_experts=1,
                                                           moe_layer_start_index=0))
    elif name == "deepseek_v2":
        m = t.DeepseekV2ForCausalLM(t.DeepseekV2Config(**COMMON, moe_intermediate_size=24, n_routed_experts=8,
                                                       num_experts_per_tok=2, n_shared_experts=1, n_group=4,
                                                       topk_group=2, topk_method="group_limited_greedy",
                                                       routed_scaling_factor=1.5, first_k_dense_replace=0,
                                                       qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                                                       kv_lora_rank=16, q_lora_rank=None))
    elif name == "deepseek_v3":
        m = t.DeepseekV3ForCausalLM(t.DeepseekV3Config(**COMMON, moe_intermediate_size=24, n_routed_experts=8,
                                                       num_experts_per_tok=2, n_shared_experts=1, n_group=4,
                                                       topk_group=2, routed_scaling_factor=2.5,
                                                       first_k_dense_replace=0, qk_rope_head_dim=8,
                                                       qk_nope_head_dim=8, v_head_dim=16, kv_lora_rank=16,
                                                       q_lora_rank=None))
    elif name == "gpt_oss":
        m = t.GptOssForCausalLM(t.GptOssConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2, head_dim=16))
    elif name == "llama4":
        m = t.Llama4ForCausalLM(t.Llama4TextConfig(**COMMON, intermediate_size_mlp=40, num_local_experts=4,
                                                   num_experts_per_tok=1, head_dim=16, interleave_moe_layer_step=1))
    elif name == "lfm2_moe":
        m = t.Lfm2MoeForCausalLM(t.Lfm2MoeConfig(**COMMON, moe_intermediate_size=24, num_experts=6,
                                                 num_experts_per_tok=2, num_dense_layers=0, use_expert_bias=True,
                                                 layer_types=["full_attention", "conv"]))
    else:
        raise KeyError(name)
    blocks = [mod for mod in m.modules() if type(mod).__name__ in pk.ops.moe.hf.CONVERTERS]
    return m.eval(), blocks[0]


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "jamba", "granitemoe", "dbrx", "ernie4_5_moe", "deepseek_v2",
            "deepseek_v3", "gpt_oss", "llama4", "lfm2_moe"]


def _randomize(module, seed=0):
    """Non-trivial weights (some versions initialise experts or biases to 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.1))
        for name, b in module.named_buffers():
            if b.is_floating_point() and "bias" in name:  # selection biases: make them matter
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)


def _build(name):
    try:
        return _family(name)
    except (AttributeError, TypeError, ValueError, ImportError) as e:  # not in this transformers
        pytest.skip(f"{name}: {type(e).__name__}: {e}")


@pytest.mark.parametrize("name", FAMILIES)
def test_block_conversion_matches_hf(name):
    torch.manual_seed(0)
    _, block = _build(name)
    _randomize(block)
    layer = pk.TopKMoE.from_hf(block)
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = block(x.clone())
        got = layer(x.clone())
    if isinstance(want, tuple):
        assert isinstance(got, tuple), "the converted layer returns a tuple like the block"
        want, got = want[0], got[0]
    torch.testing.assert_close(got, want.reshape(got.shape), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "llama4"])
def test_convert_moe_keeps_logits_and_generate(name):
    model, _ = _build(name)
    for block in [m for m in model.modules() if type(m).__name__ in pk.ops.moe.hf.CONVERTERS]:
        _randomize(block)
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        want_tokens = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    names = pk.convert_moe(model)
    assert names and all(isinstance(model.get_submodule(n), pk.TopKMoE) for n in names)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
        assert torch.equal(model.generate(input_ids=ids, max_new_tokens=4, do_sample=False), want_tokens)


def test_switch_per_sequence_capacity_and_drops():
    """Switch routes top-1 with a fixed expert_capacity per sequence: the
    converted layer keeps those drops on any batch shape (a [6, 4, d] batch of
    short sequences included)."""
    cfg = transformers.SwitchTransformersConfig(d_model=32, d_ff=48, num_layers=2, num_sparse_encoder_layers=1,
                                                num_decoder_layers=2, num_sparse_decoder_layers=1, num_heads=2,
                                                num_experts=4, expert_capacity=2, vocab_size=64, router_bias=True)
    model = transformers.SwitchTransformersModel(cfg).eval()
    block = next(m for m in model.modules() if type(m).__name__ == "SwitchTransformersSparseMLP")
    _randomize(block)
    layer = pk.TopKMoE.from_hf(block)
    for shape in ((2, 9, 32), (6, 4, 32)):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            want, got = block(x.clone()), layer(x.clone())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (got.abs().sum(-1) == 0).any(), "capacity 2 of 4 experts drops tokens"


def _nllb_block(**router):
    cfg = transformers.NllbMoeConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=48,
                                     decoder_ffn_dim=48, num_experts=4, encoder_sparse_step=1, decoder_sparse_step=1,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2,
                                     **router)
    model = transformers.NllbMoeForConditionalGeneration(cfg)
    block = next(m for m in model.modules() if type(m).__name__ == "NllbMoeSparseMLP")
    _randomize(block)
    return block


def _nllb_reference(block, x):
    """What NLLB's router defines: Σ over experts of its combine weight
    (0 for dropped or unchosen experts) times the block's own expert, scaled
    by 1 - moe_token_dropout in eval."""
    flat = x.reshape(-1, x.shape[-1])
    _, probs, _ = block.router(flat)
    y = sum(probs[:, e:e + 1] * block.experts[f"expert_{e}"](flat) for e in range(block.num_experts))
    return (y * (1 - block.experts.moe_token_dropout if not block.training else 1)).reshape(x.shape), probs


@pytest.mark.parametrize("router", [
    dict(), dict(normalize_router_prob_before_dropping=True), dict(batch_prioritized_routing=True)],
    ids=["renormalize-after-drop", "normalize-before-drop", "batch-prioritized"])
def test_nllb_router_weights_and_drops(router):
    """NLLB-MoE in eval (capacity = the token count: nothing dropped, outputs
    scaled by 1 - token dropout) and in training with a capacity of 3 of 20
    tokens per expert (drops, renormalised after or before them), against the
    router's own combine weights on the block's experts."""
    block = _nllb_block(expert_capacity=3, moe_token_dropout=0.2, **router)
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(5))
    for training in (True, False):  # training first: an eval pass overwrites the router's expert_capacity
        block.train(training)
        layer = pk.TopKMoE.from_hf(block)
        if training:
            layer.token_dropout = 0.0  # random in training: compare the routing and the experts
            block.experts.moe_token_dropout = 0.0
        with torch.no_grad():
            want, probs = _nllb_reference(block, x)
            got = layer(x, torch.zeros(2, 10))  # NLLB's layers pass their attention mask
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        kept = (probs > 0).sum().item()
        assert (kept < 40) == training, f"{kept} of 40 choices kept"
        block.experts.moe_token_dropout = 0.2


def _loop_route(logits, top_k, **opts):
    """select_experts by hand, one token at a time."""
    weights, experts = [], []
    for row in logits.float():
        if opts.get("score_over") == "topk":
            v, i = torch.topk(row, top_k)
            w = torch.softmax(v, -1)
        else:
            scores = torch.softmax(row, -1) if opts.get("scoring", "softmax") == "softmax" else torch.sigmoid(row)
            choice = scores + opts.get("selection_bias", 0)
            if opts.get("n_group"):
                g = choice.reshape(opts["n_group"], -1)
                gs = g.max(-1).values if opts.get("group_score", "max") == "max" else g.topk(2).values.sum(-1)
                keep = torch.zeros(opts["n_group"], dtype=torch.bool)
                keep[gs.topk(opts["topk_group"]).indices] = True
                choice = torch.where(keep.repeat_interleave(g.shape[1]), choice, float("-inf"))
            i = choice.topk(top_k).indices
            w = scores[i]
            if opts.get("normalize", True):
                w = w / w.norm(p=opts.get("norm_p", 1.0))
        weights.append(w * opts.get("routed_scaling_factor", 1.0))
        experts.append(i)
    return torch.stack(weights), torch.stack(experts)


@pytest.mark.parametrize("opts", [
    dict(), dict(normalize=False), dict(scoring="sigmoid"), dict(score_over="topk"), dict(norm_p=2.0),
    dict(scoring="sigmoid", n_group=4, topk_group=2, group_score="top2_sum", routed_scaling_factor=2.5),
    dict(n_group=2, topk_group=1), dict(scoring="sigmoid", selection_bias=torch.linspace(-0.2, 0.2, 8)),
], ids=["softmax", "no-norm", "sigmoid", "softmax-over-topk", "p-norm", "deepseek-v3", "group-max", "bias"])
def test_router_options_against_a_loop(opts):
    logits = torch.randn(17, 8, generator=torch.Generator().manual_seed(4))
    w, e, _ = pk.select_experts(logits, 3, **opts)
    want_w, want_e = _loop_route(logits, 3, **opts)
    assert torch.equal(e, want_e), "experts differ"
    torch.testing.assert_close(w, want_w)


def test_renormalize_after_drop_and_shared_experts():
    """NLLB's normalize-after-dropping: a token that lost one choice gets
    weight 1 on the other. Shared experts (with a sigmoid gate) add to every
    token."""
    logits = torch.tensor([[2.0, 1.0, 0.0], [2.0, 0.5, 0.0], [2.0, 0.0, 0.9]])
    gates, idx = pk.topk_route(logits, 2, capacity=2, normalize=False, renormalize_after_drop=True)
    # expert 0 keeps tokens 0, 1; token 2 loses expert 0 and keeps expert 2 alone, with weight 1
    slot = (idx == 2).nonzero()
    assert slot.tolist() == [[2, 0]] and torch.isclose(gates[2, 0], torch.tensor(1.0))
    # tokens 0 and 1 kept both choices: their weights sum to 1
    for t in (0, 1):
        assert torch.isclose(gates[idx == t].sum(), torch.tensor(1.0))
    # without renormalizing, token 2 keeps its softmax probability
    plain, _ = pk.topk_route(logits, 2, capacity=2, normalize=False)
    torch.testing.assert_close(plain[2, 0], torch.softmax(logits[2], 0)[2])
    torch.manual_seed(0)
    layer = pk.TopKMoE(16, 24, 4, top_k=2, capacity_factor=2.0, shared_hidden=20, shared_gate=True)
    x = torch.randn(5, 16)
    with torch.no_grad():
        routed = layer(x) - torch.sigmoid(layer.shared_expert_gate(x)) * layer.shared_expert(x)
        layer.shared_expert = None
        torch.testing.assert_close(routed, layer(x), rtol=1e-5, atol=1e-6)
