"""LoRALinear split for tensor parallelism (gloo, 2 processes on the CPU):
a column-parallel layer feeding a row-parallel one, through
``parallelize_module`` with ``LoRAColwiseParallel`` / ``LoRARowwiseParallel``,
gives the unsplit model's output and every gradient (each rank's shard)."""

import pytest
import torch
import torch.multiprocessing as mp
from helpers import free_port, gloo_group

import posttrain_kernels as pk


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(pk.LoRALinear(16, 24, r=4, lora_alpha=8, init_lora_weights=False), torch.nn.GELU(),
                               pk.LoRALinear(24, 12, r=6, lora_alpha=8, init_lora_weights=False))


def _worker(rank, world, port):
    with gloo_group(rank, world, port):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import parallelize_module
        single, model = _mlp(), _mlp()
        parallelize_module(model, init_device_mesh("cpu", (world,)),
                           {"0": pk.LoRAColwiseParallel(), "2": pk.LoRARowwiseParallel()})
        x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
        cot = torch.randn(5, 12, generator=torch.Generator().manual_seed(2))
        xs, xt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ys, yt = single(xs), model(xt)
        torch.testing.assert_close(yt, ys, rtol=1e-5, atol=1e-5)
        (ys * cot).sum().backward()
        (yt * cot).sum().backward()
        torch.testing.assert_close(xt.grad, xs.grad, rtol=1e-5, atol=1e-5)
        col, row = 24 // world, 24 // world
        want = {"0.lora_A.weight": single[0].lora_A.weight.grad,
                "0.lora_B.weight": single[0].lora_B.weight.grad[rank * col:(rank + 1) * col],
                "2.lora_A.weight": single[2].lora_A.weight.grad[:, rank * row:(rank + 1) * row],
                "2.lora_B.weight": single[2].lora_B.weight.grad}
        got = dict(model.named_parameters())
        for n, w in want.items():
            torch.testing.assert_close(got[n].grad, w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_column_then_row_parallel_equals_unsplit():
    port = free_port()
    mp.spawn(_worker, args=(2, port), nprocs=2, join=True)


def test_fsdp_wrapped_lora_units_give_a_clear_error():
    layer = pk.LoRALinear(8, 6, r=2)
    layer.lora_A.weight = torch.nn.Parameter(torch.zeros(16))  # what a sharding wrapper leaves there
    with pytest.raises(ValueError, match="^lora_A: .*one unit"):
        layer(torch.randn(3, 8))


def _fsdp_worker(rank, world, port):
    with gloo_group(rank, world, port):
        import transformers
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        def model():
            torch.manual_seed(0)
            cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
            m = transformers.LlamaForCausalLM(cfg)
            pk.apply_lora(m, ["q_proj", "v_proj", "down_proj"], r=4, init_lora_weights=False)
            return m
        single, sharded = model(), model()
        mesh = init_device_mesh("cpu", (world,))
        for block in sharded.model.layers:  # each decoder block one unit: LoRA weights gathered with it
            fully_shard(block, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        ids = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(3))
        mine = ids[rank * 2:(rank + 1) * 2]
        single(input_ids=ids, labels=ids).loss.backward()
        sharded(input_ids=mine, labels=mine).loss.backward()
        for (n, p), (_, q) in zip(single.named_parameters(), sharded.named_parameters()):
            if p.grad is None:
                assert q.grad is None, n
                continue
            got = q.grad.full_tensor()
            torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_fsdp2_blocks_as_units_equal_single_process():
    """FSDP2 with each decoder block (LoRA layers inside) as one unit: the
    LoRA gradients, reduced over 2 processes, equal single-process training
    on the whole batch (both batches' halves have equal token counts)."""
    pytest.importorskip("transformers")
    port = free_port()
    mp.spawn(_fsdp_worker, args=(2, port), nprocs=2, join=True)


def test_fsdp1_wrap_policy_units_are_the_blocks(tiny_llama):
    """The FSDP1 policy wraps each decoder block (LoRA layers inside), never
    lora_A / lora_B alone. (FSDP1 itself needs a GPU: the policy is checked
    here, the training on a GPU.)"""
    model = tiny_llama()
    pk.apply_lora(model, ["q_proj", "v_proj"], r=4)
    policy = pk.fsdp_auto_wrap_policy(model)
    wrapped = [n for n, m in model.named_modules() if n and policy(m, recurse=False, nonwrapped_numel=0)]
    assert wrapped == ["model.layers.0", "model.layers.1"], wrapped
    with pytest.raises(ValueError, match="^model"):
        pk.fsdp_auto_wrap_policy(torch.nn.Sequential(torch.nn.ReLU()))
