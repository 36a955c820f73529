"""Expert parallelism: time and bytes of a sharded MoE layer's forward+backward.

    python -m posttrain_kernels.bench.expert_parallel [--world 2] [--tokens 2048] [--d 256] [--hidden 1024]
        [--experts 8] [--backend gloo|nccl]

Spawns ``world`` processes on 127.0.0.1 (gloo on CPU, one thread each; NCCL
with one GPU per rank when asked), runs an expert-choice and a top-2 layer
sharded over them (both exchanges) and, in rank 0, the same layer unsharded
on the whole batch, and prints the median step time and the bytes each rank
sends per layer call, split by collective. On a CPU the numbers say what the
exchange costs next to CPU GEMMs, not what a GPU cluster would see.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _layers(args):
    import posttrain_kernels as pk
    return {
        "expert-choice C=2": lambda: pk.ExpertChoiceMoE(args.d, args.hidden, args.experts, capacity_factor=2.0,
                                                        backend="reference"),
        "top-2 CF=1.25": lambda: pk.TopKMoE(args.d, args.hidden, args.experts, top_k=2, capacity_factor=1.25,
                                            backend="reference"),
    }


def _time(fn, reps):
    fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e3


def sent_bytes(layer, x_local, exchange: str) -> dict:
    """Bytes this rank sends in one forward+backward, by collective (from the
    layer's own exchange plan)."""
    from posttrain_kernels.ops.moe import parallel
    shard, E = layer.expert_shard, layer.num_experts
    W, d = shard.world, x_local.shape[1]
    elem = x_local.element_size()
    with torch.no_grad():
        logits = torch.nn.functional.linear(x_local.float(), layer.router.weight)
        all_logits, offsets = parallel.gather_logits(logits, shard)
        _, token_idx = layer._route(all_logits, layer.group_size or offsets[-1], layer.group_size)
        plan = parallel.plan_exchange(token_idx, offsets, shard)
    C = token_idx.shape[1]
    if exchange == "exact":
        rows_out = sum(c for q, c in enumerate(plan.send_splits) if q != shard.rank)  # tokens to other ranks
        rows_back = sum(c for q, c in enumerate(plan.recv_splits) if q != shard.rank)  # results to their owners
    else:
        rows_out = rows_back = (W - 1) * shard.local * C  # fixed blocks to every other rank
    n_max = max(offsets[i + 1] - offsets[i] for i in range(W))
    return {
        "router logits (all-gather, fwd + its bwd)": 2 * (W - 1) * n_max * E * 4,
        "tokens to experts (fwd) + their gradients (bwd)": (rows_out + rows_back) * d * elem,
        "expert outputs to owners (fwd) + their gradients (bwd)": (rows_back + rows_out) * d * elem,
        "router gradient (all-reduce)": 2 * (W - 1) * E * d * 4 // W,
    }


def _worker(rank, world, port, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = args.backend
    dist.init_process_group(backend, rank=rank, world_size=world)
    torch.set_num_threads(1)
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    try:
        g = torch.Generator().manual_seed(0)
        allx = torch.randn(args.tokens, args.d, generator=g).to(device)
        per = args.tokens // world
        mine = allx[rank * per:(rank + 1) * per]
        for name, make in _layers(args).items():
            for exchange in ("exact", "static"):
                torch.manual_seed(0)
                layer = make().to(device).shard_experts(exchange=exchange)
                x = mine.clone().requires_grad_(True)

                def step():
                    layer(x).sum().backward()
                    dist.barrier()
                ms = _time(step, args.reps)
                nbytes = sent_bytes(layer, mine, exchange)
                if rank == 0:
                    results.append((name, f"sharded over {world}, {exchange}", ms, nbytes))
            if rank == 0:
                torch.manual_seed(0)
                single = make().to(device)
                xs = allx.clone().requires_grad_(True)
                results.append((name, "one process, whole batch", _time(lambda: single(xs).sum().backward(),
                                                                        args.reps), None))
    finally:
        dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    args = ap.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().list()
    mp.spawn(_worker, args=(args.world, port, args, results), nprocs=args.world, join=True)
    print(f"n={args.tokens} d={args.d} F={args.hidden} E={args.experts}, fp32, {args.backend}, "
          f"{'one CPU thread per process' if args.backend == 'gloo' else 'one GPU per rank'}")
    print("| layer | run | median fwd+bwd ms | bytes sent by rank 0 per call (fwd+bwd) |")
    print("|---|---|---:|---:|")
    for name, run, ms, nbytes in results:
        total = "" if nbytes is None else f"{sum(nbytes.values()) / 1e6:.2f} MB"
        print(f"| {name} | {run} | {ms:.1f} | {total} |")
    for name, run, ms, nbytes in results:
        if nbytes:
            print(f"{name}, {run}: " + "; ".join(f"{k} {v / 1e6:.3f} MB" for k, v in nbytes.items()))


if __name__ == "__main__":
    main()
