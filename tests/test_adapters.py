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
