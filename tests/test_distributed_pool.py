"""Training several adapters with AdapterPool under DistributedDataParallel
(gloo, 2 processes on the CPU, 127.0.0.1): after one optimizer step the slot
gradients and weights equal single-process training on the concatenated
batch, and only the adapters train (the base model is frozen)."""
import os

import pytest
import torch
import torch.multiprocessing as mp
from helpers import free_port, gloo_group

import posttrain_kernels as pk

transformers = pytest.importorskip("transformers")

ROWS = ["a", "b", None, "a"]  # rank 0 takes rows 0-1, rank 1 rows 2-3


def _model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=64, bos_token_id=0, eos_token_id=0)
    model = transformers.LlamaForCausalLM(cfg)
    pool = pk.AdapterPool(model, target_modules=["q_proj", "v_proj", "down_proj"], max_adapters=2, max_rank=8)
    torch.manual_seed(1)
    pool.add("a", r=4, lora_alpha=8, init_lora_weights=False)
    pool.add("b", r=8, lora_alpha=8, init_lora_weights=False)
    return model, pool


def _batch():
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 64, (4, 6), generator=g)


def _step(model, pool, ids, rows, wrapped=None):
    params = pool.trainable_parameters()
    opt = torch.optim.SGD(params, lr=0.5)
    with pool.batch(rows):
        loss = (wrapped or model)(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, weights


def _worker(rank, world, port, out):
    with gloo_group(rank, world, port):
        model, pool = _model()
        pool.trainable_parameters()  # freeze the base model before DDP records the parameters to reduce
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        ids, per = _batch(), len(ROWS) // world
        mine = slice(rank * per, (rank + 1) * per)
        grads, weights = _step(model, pool, ids[mine], ROWS[mine], wrapped=ddp)
        trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        torch.save({"grads": grads, "weights": weights, "trainable": trainable}, os.path.join(out, f"rank{rank}.pt"))


def test_ddp_pool_training_equals_single_process(tmp_path):
    model, pool = _model()
    want_grads, want_weights = _step(model, pool, _batch(), ROWS)
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["trainable"] and all(".lora_A" in n or ".lora_B" in n for n in got["trainable"]), \
            f"only the slot stacks train, got {got['trainable']}"
        assert set(got["grads"]) == set(want_grads)
        for name, g in want_grads.items():
            # DDP averages the two halves' gradients: the mean loss over the whole batch.
            torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
        for name, w in want_weights.items():
            torch.testing.assert_close(got["weights"][name], w, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
