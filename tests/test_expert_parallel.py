"""Expert parallelism on torch.distributed: 2 and 4 gloo processes on the CPU
(127.0.0.1), each holding E / world experts, against the single-process layer
on the concatenated batch (computed in every worker from the same seeds).

For both routers, with and without capacity drops, both exchanges, LoRA on
the experts (adapters sharded with them), and an
upcycled GPT-2 / Llama MLP: the slot tables (choices, drops, gates) are
bitwise the single-process layer's; outputs and input gradients equal within
fp32 rounding (the combine sums in the same order; the expert GEMMs batch
E/world experts instead of E, which can change a last bit); this rank's
expert gradients equal the single-process layer's rows of those experts, and
router gradients after the all-reduce, within tolerance. Objective: the mean over ranks of each rank's loss (DDP's
convention, ``grad_reduction="mean"``), or their sum.
"""

import pytest
import torch
import torch.multiprocessing as mp
from helpers import free_port, gloo_group

import posttrain_kernels as pk

def _with_lora(layer):
    """LoRA on every expert projection (random B, a rank pattern): the adapters live with their experts."""
    layer.add_expert_lora(4, 8, rank_pattern={1: 2})
    with torch.no_grad():
        for adapter in layer.experts.lora.values():
            adapter.lora_B.normal_()
    return layer


CASES = [  # (name, layer factory, exchange, grad_reduction)
    ("expert-choice", lambda: pk.ExpertChoiceMoE(12, 20, 4, capacity_factor=2.0), "exact", "mean"),
    ("expert-choice-static", lambda: pk.ExpertChoiceMoE(12, 20, 4, capacity_factor=1.0), "static", "mean"),
    ("top2-no-drops", lambda: pk.TopKMoE(12, 20, 4, top_k=2, capacity_factor=2.0), "exact", "mean"),
    ("top2-drops", lambda: pk.TopKMoE(12, 20, 4, top_k=2, capacity_factor=0.75), "exact", "sum"),
    ("top1-drops-static", lambda: pk.TopKMoE(12, 20, 4, top_k=1, capacity_factor=0.5, gated=False,
                                             activation="gelu", bias=True), "static", "sum"),
    ("top2-groups", lambda: pk.TopKMoE(12, 20, 4, top_k=2, capacity_factor=1.0, group_size=2), "exact", "mean"),
    ("top2-expert-lora", lambda: _with_lora(pk.TopKMoE(12, 20, 4, top_k=2, capacity_factor=0.75)), "exact", "mean"),
    ("expert-choice-expert-lora", lambda: _with_lora(pk.ExpertChoiceMoE(12, 20, 4, capacity_factor=1.0, bias=True)),
     "static", "sum"),
]


def _tokens(rank, world, exchange):
    """Rank r's tokens; unequal counts with the exact exchange (4 + r rows)."""
    counts = [6] * world if exchange == "static" else [4 + 2 * q for q in range(world)]
    g = torch.Generator().manual_seed(100)
    allx = torch.randn(sum(counts), 12, generator=g)
    first = sum(counts[:rank])
    return allx, slice(first, first + counts[rank])


def _run(layer, x, cot):
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    (y * cot).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


def _check_case(rank, world, name, make, exchange, reduction):
    torch.manual_seed(0)
    single = make()
    torch.manual_seed(0)
    sharded = make().shard_experts(exchange=exchange, grad_reduction=reduction)
    allx, mine = _tokens(rank, world, exchange)
    cot = torch.randn(allx.shape[0], 12, generator=torch.Generator().manual_seed(7))
    y1, dx1, g1 = _run(single, allx, cot)
    y2, dx2, g2 = _run(sharded, allx[mine], cot[mine])
    scale = 1.0 / world if reduction == "mean" else 1.0  # the objective: mean or sum over ranks of their losses
    # The combine sums in the single-process order; the expert GEMMs run over E/world experts instead of E,
    # which may change the last bit (seen at world 4): equal within fp32 rounding.
    torch.testing.assert_close(y2, y1[mine], rtol=0, atol=1e-6, msg=lambda m: f"{name} y: {m}")
    _check_same_routing(single, sharded, allx, mine, name)
    torch.testing.assert_close(dx2, dx1[mine], rtol=0, atol=1e-6, msg=lambda m: f"{name} dx: {m}")
    E_l = sharded.num_experts // world
    for n, g in g2.items():
        if n.startswith("experts."):
            want = g1[n][rank * E_l:(rank + 1) * E_l] * scale
            torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} {n}: {m}")
    torch.testing.assert_close(g2["router.weight"], g1["router.weight"] * scale, rtol=1e-4, atol=1e-6,
                               msg=lambda m: f"{name} router: {m}")
    for key, value in single.aux_losses.items():
        torch.testing.assert_close(sharded.aux_losses[key], value, msg=lambda m: f"{name} {key}: {m}")


def _check_same_routing(single, sharded, allx, mine, name):
    """The sharded layer's slot table (from the gathered logits) is the single
    process's on the concatenated batch: the same choices and drops."""
    from posttrain_kernels.ops.moe import parallel
    with torch.no_grad():
        logits = torch.nn.functional.linear(allx[mine], sharded.router.weight)
        all_logits, offsets = parallel.gather_logits(logits, sharded.expert_shard)
        got = sharded._route(all_logits, sharded.group_size or offsets[-1], sharded.group_size)
        want = single._route(torch.nn.functional.linear(allx, single.router.weight), single.group_size or len(allx),
                             single.group_size)
    assert torch.equal(got[1], want[1]), f"{name}: token choices / drops differ"
    assert torch.equal(got[0], want[0]), f"{name}: gates differ"


def _check_upcycled(rank, world):
    transformers = pytest.importorskip("transformers")
    for family in ("gpt2", "llama"):
        torch.manual_seed(0)
        if family == "gpt2":
            cfg = transformers.GPT2Config(n_embd=12, n_layer=1, n_head=2, n_positions=8, vocab_size=16)
            mlp = transformers.GPT2Model(cfg).h[0].mlp
        else:
            cfg = transformers.LlamaConfig(hidden_size=12, intermediate_size=20, num_hidden_layers=1,
                                           num_attention_heads=2, vocab_size=16)
            mlp = transformers.LlamaForCausalLM(cfg).model.layers[0].mlp
        make = lambda: pk.upcycle_mlp(mlp, 4, router="topk", top_k=2, capacity_factor=1.0).eval()  # noqa: E731
        _check_case(rank, world, f"upcycled-{family}", make, "exact", "mean")


def _check_with_ddp(rank, world):
    """A model whose MoE layer is sharded, wrapped in DDP with the layer's
    parameters left to the layer: every gradient is DDP's (the mean over
    ranks of their losses), the dense layers' reduced by DDP, the MoE's by
    the layer."""
    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(12, 12), pk.TopKMoE(12, 20, 4, top_k=2, capacity_factor=1.0),
                                   torch.nn.Linear(12, 12))
    single, model = make(), make()
    model[1].shard_experts()
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, pk.expert_parallel_parameter_names(model))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    allx, mine = _tokens(rank, world, "exact")
    cot = torch.randn(allx.shape[0], 12, generator=torch.Generator().manual_seed(9))
    (single(allx) * cot).sum().backward()
    (ddp(allx[mine]) * cot[mine]).sum().backward()
    E_l = 4 // world
    for (n, p), (_, q) in zip(single.named_parameters(), model.named_parameters()):
        want = p.grad[rank * E_l:(rank + 1) * E_l] if ".experts." in n else p.grad
        torch.testing.assert_close(q.grad, want / world, rtol=1e-4, atol=1e-6, msg=lambda m: f"ddp {n}: {m}")


def _check_with_fsdp2(rank, world):
    """The same model with FSDP2 (``fully_shard``) sharding the dense layers
    and the MoE layer's parameters passed as ``ignored_params``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(12, 12), pk.ExpertChoiceMoE(12, 20, 4), torch.nn.Linear(12, 12))
    single, model = make(), make()
    model[1].shard_experts()
    names = set(pk.expert_parallel_parameter_names(model))
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)),
                ignored_params={p for n, p in model.named_parameters() if n in names})
    allx, mine = _tokens(rank, world, "static")
    cot = torch.randn(allx.shape[0], 12, generator=torch.Generator().manual_seed(9))
    (single(allx) * cot).sum().backward()
    (model(allx[mine]) * cot[mine]).sum().backward()
    E_l = 4 // world
    for (n, p), (_, q) in zip(single.named_parameters(), model.named_parameters()):
        got = q.grad.full_tensor() if hasattr(q.grad, "full_tensor") else q.grad
        want = p.grad[rank * E_l:(rank + 1) * E_l] if ".experts." in n else p.grad
        torch.testing.assert_close(got, want / world, rtol=1e-4, atol=1e-6, msg=lambda m: f"fsdp2 {n}: {m}")


def _worker(rank, world, port, upcycled):
    with gloo_group(rank, world, port):
        for name, make, exchange, reduction in CASES:
            _check_case(rank, world, name, make, exchange, reduction)
        _check_with_ddp(rank, world)
        if upcycled:  # the 2-process run also covers upcycled layers and FSDP2
            _check_upcycled(rank, world)
            _check_with_fsdp2(rank, world)


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_layers_equal_single_process(world):
    mp.spawn(_worker, args=(world, free_port(), world == 2), nprocs=world, join=True)


def test_shard_experts_errors():
    layer = pk.TopKMoE(8, 12, 3)
    with pytest.raises(ValueError, match="^group"):
        layer.shard_experts()  # torch.distributed not initialised
    assert pk.expert_parallel_parameter_names(torch.nn.Sequential(layer)) == []
