"""Tensor parallelism for ``LoRALinear`` (Megatron's column / row split),
as ``ParallelStyle`` s for ``torch.distributed.tensor.parallel.parallelize_module``.

* ``LoRAColwiseParallel``: the base weight and ``lora_B`` split by output
  rows, ``lora_A`` replicated. Input: the full (replicated) x; output: this
  rank's slice of the output features. The backward all-reduces dx and
  ``lora_A``'s gradient (both are sums of every shard's part).
* ``LoRARowwiseParallel``: the base weight and ``lora_A`` split by input
  columns, ``lora_B`` replicated. Input: this rank's slice of x's features;
  output: the full y, all-reduced (the low-rank activations are partial sums
  too, and the term is linear in them); the bias is added once, after the
  reduction. The backward all-reduces ``lora_B``'s gradient.

Both return local tensors, as torch's ``ColwiseParallel`` /
``RowwiseParallel`` do with ``use_local_output=True``, so they chain with
each other and with torch's styles on plain ``nn.Linear`` layers (which
they also accept: such a layer gets torch's own style). Every rank must use
the same torch seed for dropout (the column split's masks are drawn once for
the replicated x); the row split offsets the mask seed by the rank, so its
shards drop independently (the masks then differ from the unsplit layer's).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from ..common import all_reduce_sum, check


@dataclasses.dataclass(frozen=True)
class TensorShard:
    group: object
    world: int
    rank: int
    style: str  # "colwise" or "rowwise"


class _CopyToShards(torch.autograd.Function):
    """Identity forward; the backward sums the shards' gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return all_reduce_sum(g, ctx.group), None


class _SumShards(torch.autograd.Function):
    """All-reduce (sum) forward; identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        return all_reduce_sum(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


def shard_lora_linear(layer: nn.Module, group, style: str) -> nn.Module:
    """Keep this rank's share of ``layer`` (a ``LoRALinear``) for the
    ``style`` split over ``group``; see the module doc. Returns the layer."""
    check(style in ("colwise", "rowwise"), "style", f"expected 'colwise' or 'rowwise', got {style!r}")
    check(getattr(layer, "tensor_shard", None) is None and not layer.merged, "layer",
          "already split, or merged (unmerge first)")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    N, K = layer.out_features, layer.in_features
    dim = N if style == "colwise" else K
    check(dim % world == 0, "layer", f"{style}: the world size {world} must divide "
          f"{'out' if style == 'colwise' else 'in'}_features={dim}")
    part = dim // world
    lo, hi = rank * part, (rank + 1) * part
    W = layer.weight_nk.detach()
    frozen = lambda t: nn.Parameter(t.contiguous().clone(), requires_grad=False)  # noqa: E731
    with torch.no_grad():
        if style == "colwise":
            layer.weight = frozen(W[lo:hi])
            if layer.bias is not None:
                layer.bias = nn.Parameter(layer.bias.detach()[lo:hi].clone(), requires_grad=layer.bias.requires_grad)
            layer.lora_B.weight = nn.Parameter(layer.lora_B.weight.detach()[lo:hi].clone())
            layer.lora_A.weight.register_hook(lambda g: all_reduce_sum(g, group))
            layer.out_features = part
        else:
            layer.weight = frozen(W[:, lo:hi])
            layer.lora_A.weight = nn.Parameter(layer.lora_A.weight.detach()[:, lo:hi].clone())
            layer.lora_B.weight.register_hook(lambda g: all_reduce_sum(g, group))
            layer.in_features = part
    layer.fan_in_fan_out = False  # the local shard is stored [out, in]
    layer.tensor_shard = TensorShard(group, world, rank, style)
    return layer


def sharded_forward(layer, x: torch.Tensor, p: float) -> torch.Tensor:
    """The forward of a split ``LoRALinear`` (``layer.tensor_shard`` set)."""
    from .function import lora_linear
    shard = layer.tensor_shard
    A, B = layer.lora_A.weight, layer.lora_B.weight
    if shard.style == "colwise":
        x = _CopyToShards.apply(x, shard.group)
        return lora_linear(x, layer.weight, A, B, layer.scaling, layer.bias, p)
    seed = None
    if p > 0:  # independent masks per shard of the input features
        seed = (torch.randint(0, 2**31 - 1 - shard.world, (1,), device=x.device) + shard.rank).to(torch.int32)
    y = _SumShards.apply(lora_linear(x, layer.weight, A, B, layer.scaling, None, p, dropout_seed=seed), shard.group)
    return y if layer.bias is None else y + layer.bias


def _group(device_mesh):
    return device_mesh.get_group() if device_mesh is not None else None


try:
    from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel
except ImportError:  # pragma: no cover - torch without tensor parallelism
    ParallelStyle = object
    ColwiseParallel = RowwiseParallel = None


class LoRAColwiseParallel(ParallelStyle):
    """``ColwiseParallel`` for ``LoRALinear`` (torch's own for a plain
    ``nn.Linear``); see the module doc."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        from .layer import LoRALinear
        if isinstance(module, LoRALinear):
            return shard_lora_linear(module, _group(device_mesh), "colwise")
        return ColwiseParallel()._apply(module, device_mesh)


class LoRARowwiseParallel(ParallelStyle):
    """``RowwiseParallel`` for ``LoRALinear`` (torch's own for a plain
    ``nn.Linear``); see the module doc."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        from .layer import LoRALinear
        if isinstance(module, LoRALinear):
            return shard_lora_linear(module, _group(device_mesh), "rowwise")
        return RowwiseParallel()._apply(module, device_mesh)
