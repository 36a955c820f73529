"""Test helpers: the tolerance rule (docs/testing.md), the gloo process
group of the distributed tests (spawned processes on 127.0.0.1), the GPU tests' device."""
import contextlib
import os
import socket
import sys
import traceback

import torch
import torch.distributed as dist

# The device of the GPU tests (test_*_gpu.py): CUDA. Only when a compile count runs them with
# launches stubbed on a machine without one (autotune/compile_only.py, POSTTRAIN_KERNELS_PRETEND_GPU):
# the CPU, planned as for the pretended GPU; their results are garbage then and not checked.
COUNTING_ON_CPU = not torch.cuda.is_available() and bool(os.environ.get("POSTTRAIN_KERNELS_PRETEND_GPU")) \
    and bool(os.environ.get("POSTTRAIN_KERNELS_COMPILE_ONLY"))
GPU = torch.device("cpu" if COUNTING_ON_CPU else "cuda")

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_close_rule(name, ours, ref_lowp, ref_hi, atol):
    """max|ours − ref_hi| ≤ 2·max|ref_lowp − ref_hi| + atol·max(1, max|ref_hi|).

    ref_lowp is a plain PyTorch computation in the low precision, ref_hi the
    same in fp64: ours may be at most twice as far from the truth as PyTorch
    itself is.
    """
    assert ours.shape == ref_hi.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref_hi.shape)}"
    # The rule needs PyTorch's own low-precision error: passing the reference
    # twice would silently drop the 2x term.
    assert ref_lowp.dtype != ref_hi.dtype, f"{name}: ref_lowp must be computed in lower precision than ref_hi"
    ours, ref_lowp, ref_hi = ours.double(), ref_lowp.double(), ref_hi.double()
    assert torch.isfinite(ours).all(), f"{name}: non-finite values (unwritten output?)"
    err = (ours - ref_hi).abs().max().item() if ours.numel() else 0.0
    base = (ref_lowp - ref_hi).abs().max().item() if ours.numel() else 0.0
    mag = max(1.0, ref_hi.abs().max().item() if ours.numel() else 0.0)
    bound = 2 * base + atol * mag
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (pytorch low-precision error {base:.3e})"


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a process group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int):
    """This spawned worker's gloo process group on 127.0.0.1 for the block. A worker whose block
    raised prints the traceback, destroys the group and re-raises (``mp.spawn`` reports it). A worker whose block
    succeeded waits for every rank (a barrier), then ends its process at once (``os._exit(0)``,
    streams flushed): the C++ teardown of the group and of the interpreter, racing the other
    ranks' exits, aborted a rank now and then ("terminate called without an active exception",
    SIGABRT after the work was done: 4 runs in 8 of the expert-parallel test on one machine,
    1 in 10 with the barrier alone), which failed a test whose every check had passed."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    except BaseException:
        # On stderr too: the peers fail in the barrier below ("connection closed by peer"), and
        # mp.spawn reports whichever rank it sees first.
        traceback.print_exc()
        dist.destroy_process_group()
        raise
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def assert_same_in_a_cuda_graph(fn):
    """``fn()`` (no host sync inside) run eagerly, then captured in a CUDA graph (after a warm-up on a
    side stream: compiles and plans are built outside the capture) and replayed: the replay's output
    must equal the eager one bit for bit."""
    want = fn()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = fn()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, want), "the graph's replay differs from the eager run"
