"""Model-level LoRA in PEFT's format: apply_lora, and the save_adapter / PEFT
round trip in both directions on a tiny Llama built from a config (no
download); malformed adapters raise and leave the model as it was."""
import json
import os

import pytest
import torch

import posttrain_kernels as pk

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _ids(device):
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1)).to(device)


def test_apply_lora_wraps_targets_and_freezes(device, tiny_llama):
    model = tiny_llama().to(device)
    names = pk.apply_lora(model, TARGETS, r=4, lora_alpha=8)
    assert len(names) == 2 * 3 and all(n.split(".")[-1] in TARGETS for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    with pytest.raises(ValueError, match="^target_modules"):
        pk.apply_lora(tiny_llama(), ["no_such_proj"])


def test_save_adapter_then_peft_loads_it(tmp_path, device, tiny_llama):
    model = tiny_llama().to(device)
    pk.apply_lora(model, TARGETS, r=4, lora_alpha=8, init_lora_weights=False)  # non-zero B
    ids = _ids(device)
    ours = model(ids).logits
    pk.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and sorted(cfg["target_modules"]) == sorted(TARGETS)
    base = tiny_llama().to(device)  # same seed: the same base weights
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    torch.testing.assert_close(peft_model(ids).logits, ours, rtol=1e-4, atol=1e-4)


def test_peft_adapter_loads_into_our_layers(tmp_path, device, tiny_llama):
    base = tiny_llama().to(device)
    cfg = peft.LoraConfig(r=6, lora_alpha=12, target_modules=TARGETS, init_lora_weights=False)
    peft_model = peft.get_peft_model(base, cfg).eval()
    ids = _ids(device)
    want = peft_model(ids).logits
    peft_model.save_pretrained(str(tmp_path))
    model = tiny_llama().to(device)
    loaded = pk.load_adapter(model, tmp_path)
    assert len(loaded) == 6
    torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)
    # Loading again into already-wrapped layers replaces the weights in place.
    assert pk.load_adapter(model, tmp_path) == loaded


def _corrupt(path, how):
    from safetensors.torch import load_file, save_file
    w = os.path.join(path, "adapter_model.safetensors")
    if how == "corrupt-file":
        with open(w, "wb") as f:
            f.write(b"not a safetensors file")
        return
    t = load_file(w)
    key = next(k for k in t if "lora_B" in k)
    if how == "missing-key":
        del t[key]
    elif how == "wrong-shape":
        t[key] = torch.zeros(t[key].shape[0] + 1, t[key].shape[1])
    elif how == "unknown-module":  # both matrices of one module renamed to a block the model lacks
        module = key.rsplit(".lora_B", 1)[0]
        for k in [k for k in t if k.startswith(module + ".")]:
            t[k.replace("layers.", "layers.9", 1)] = t.pop(k)
    save_file(t, w)


@pytest.mark.parametrize("how,text", [("corrupt-file", "safetensors"), ("missing-key", "misses"),
                                      ("wrong-shape", "do not fit"), ("unknown-module", "lacks")])
def test_malformed_adapter_leaves_model_unchanged(tmp_path, how, text, device, tiny_llama):
    src = tiny_llama().to(device)
    pk.apply_lora(src, TARGETS, r=4, lora_alpha=8, init_lora_weights=False)
    pk.save_adapter(src, tmp_path)
    _corrupt(tmp_path, how)
    model = tiny_llama().to(device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=text):
        pk.load_adapter(model, tmp_path)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, pk.LoRALinear) for m in model.modules())


def test_regex_rank_and_alpha_patterns_match_as_peft(tmp_path, device, tiny_llama):
    """PEFT matches a pattern key as a regex group at the end of the module
    name: ``"q_proj|v_proj"`` covers both projections (rank 2, alpha 2 here).
    load_adapter reads PEFT's file and gives PEFT's logits."""
    base = tiny_llama().to(device)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False,
                          rank_pattern={"q_proj|v_proj": 2}, alpha_pattern={"q_proj|v_proj": 2})
    peft_model = peft.get_peft_model(base, cfg).eval()
    ids = _ids(device)
    want = peft_model(ids).logits
    peft_model.save_pretrained(str(tmp_path))
    model = tiny_llama().to(device)
    pk.load_adapter(model, tmp_path)
    q = model.model.layers[0].self_attn.q_proj
    assert q.r == 2 and q.scaling == 1.0, (q.r, q.scaling)
    torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)


def _gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=16, vocab_size=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_gpt2_conv1d_targets_both_ways(tmp_path, device):
    """GPT-2's c_attn / c_proj / c_fc are transformers Conv1D ([in, out]
    weights, PEFT's fan_in_fan_out): apply_lora wraps them, save_adapter
    writes what PEFT reads, and a PEFT GPT-2 adapter loads with PEFT's logits."""
    ids = _ids(device)
    model = _gpt2().to(device)
    names = pk.apply_lora(model, ["c_attn", "c_proj", "c_fc", "lm_head"], r=4, lora_alpha=8, init_lora_weights=False)
    assert len(names) == 2 * 4 + 1, names
    ours = model(ids).logits
    pk.save_adapter(model, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    theirs = peft.PeftModel.from_pretrained(_gpt2().to(device), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(theirs(ids).logits, ours, rtol=1e-4, atol=1e-4)
    ref = peft.get_peft_model(_gpt2().to(device), peft.LoraConfig(r=6, lora_alpha=12, fan_in_fan_out=True,
                              target_modules=["c_attn", "c_fc"], init_lora_weights=False)).eval()
    want = ref(ids).logits
    ref.save_pretrained(str(tmp_path / "peft"))
    model = _gpt2().to(device)
    pk.load_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)
    pool = pk.AdapterPool(_gpt2().to(device), ["c_attn", "c_fc"], max_adapters=2, max_rank=8)
    pool.load("g", tmp_path / "peft")
    with torch.no_grad(), pool.batch(["g", None]):
        got = pool.model(ids).logits
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], _gpt2().to(device)(ids).logits[1], rtol=1e-4, atol=1e-4)


def test_all_linear_and_default_targets_as_peft(tiny_llama):
    for targets in ("all-linear", None):
        ours = tiny_llama()
        wrapped = set(pk.apply_lora(ours, targets, r=2))
        cfg = peft.LoraConfig(r=2, target_modules=targets)
        theirs = peft.get_peft_model(tiny_llama(), cfg)
        want = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                if isinstance(m, peft.tuners.lora.LoraLayer)}
        assert wrapped == want, (targets, sorted(wrapped ^ want))


def test_modules_to_save_both_ways(tmp_path, device, tiny_llama):
    ids = _ids(device)
    model = tiny_llama().to(device)
    pk.apply_lora(model, ["q_proj"], r=4, init_lora_weights=False, modules_to_save=["lm_head"])
    assert model.lm_head.weight.requires_grad
    with torch.no_grad():
        model.lm_head.weight.add_(0.5)  # a trained full module
    ours = model(ids).logits
    with pk.disable_adapter(model):
        torch.testing.assert_close(model(ids).logits, tiny_llama().to(device)(ids).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(ids).logits, ours)
    pk.save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_llama().to(device), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(theirs(ids).logits, ours, rtol=1e-4, atol=1e-4)
    ref = peft.get_peft_model(tiny_llama().to(device), peft.LoraConfig(r=4, target_modules=["v_proj"],
                              modules_to_save=["lm_head"], init_lora_weights=False)).eval()
    with torch.no_grad():
        ref.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    want = ref(ids).logits
    ref.save_pretrained(str(tmp_path / "peft"))
    model = tiny_llama().to(device)
    pk.load_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if "lora_" in n or n.startswith("lm_head.")}


def test_layer_restricted_targets_survive_a_save(tmp_path, device, tiny_llama):
    ids = _ids(device)
    model = tiny_llama().to(device)
    names = pk.apply_lora(model, r"model\.layers\.0\.self_attn\.(q_proj|v_proj)", r=4, init_lora_weights=False)
    assert len(names) == 2
    pk.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama().to(device), str(tmp_path)).eval()
    wrapped = {n for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert len(wrapped) == 2, f"PEFT wrapped {sorted(wrapped)}"
    torch.testing.assert_close(theirs(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    ref = peft.get_peft_model(tiny_llama().to(device), peft.LoraConfig(r=4, target_modules=["q_proj"],
                              layers_to_transform=[1], init_lora_weights=False)).eval()
    want = ref(ids).logits
    ref.save_pretrained(str(tmp_path / "ltt"))
    model = tiny_llama().to(device)
    assert pk.load_adapter(model, tmp_path / "ltt") == ["model.layers.1.self_attn.q_proj"]
    torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "loftq", "corda"])
def test_inits_that_change_the_base_need_conversion(tmp_path, init, tiny_llama):
    src = tiny_llama()
    pk.apply_lora(src, ["q_proj"], r=4)
    pk.save_adapter(src, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = init
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="path_initial_model_for_weight_conversion"):
        pk.load_adapter(tiny_llama(), tmp_path)


def test_load_adapter_trains_only_the_adapters(tmp_path, tiny_llama):
    src = tiny_llama()
    pk.apply_lora(src, TARGETS, r=4)
    pk.save_adapter(src, tmp_path)
    model = tiny_llama()
    pk.load_adapter(model, tmp_path)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable), trainable


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_and_unload_and_disable_adapter(device, family, tiny_llama):
    make = tiny_llama if family == "llama" else _gpt2
    targets = TARGETS if family == "llama" else ["c_attn", "c_fc"]
    ids = _ids(device)
    model = make().to(device)
    pk.apply_lora(model, targets, r=4, init_lora_weights=False)
    with torch.no_grad():
        lora_logits = model(ids).logits
        with pk.disable_adapter(model):
            torch.testing.assert_close(model(ids).logits, make().to(device)(ids).logits)
        torch.testing.assert_close(model(ids).logits, lora_logits)
        merged = pk.merge_and_unload(model)
        assert not any(isinstance(m, pk.LoRALinear) for m in merged.modules())
        torch.testing.assert_close(merged(ids).logits, lora_logits, rtol=1e-4, atol=1e-4)
        assert type(merged.get_submodule("model.layers.0.self_attn.q_proj" if family == "llama"
                                         else "transformer.h.0.attn.c_attn")).__name__ in ("Linear", "Conv1D")
