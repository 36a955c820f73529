"""Kernel specs and config spaces (no compile): every spec matches its
kernel's argument list, pruning rules hold, and every default the launchers
pick on a GPU is a member of the pruned space that the ahead-of-time test
compiles."""
import pytest

from posttrain_kernels.autotune import REGISTRY
from posttrain_kernels.autotune import config as C
from posttrain_kernels.autotune.lora import (LORA_DY, LORA_MATMUL, LORA_MATMUL_TMA, LORA_SHRINK, LORA_X, matmul_smem,
                                             prune_matmul, tma_smem)
from posttrain_kernels.autotune.multi_lora import (MULTI_LORA_GRAD, MULTI_LORA_MATMUL, MULTI_LORA_MATMUL_TMA,
                                                   MULTI_LORA_SHRINK)
from posttrain_kernels.autotune.registry import AotVariant, KernelSpec

SHAPES = [(1, 4096, 4096), (64, 4096, 4096), (300, 1024, 512), (8192, 4096, 4096), (8192, 14336, 4096)]


@pytest.mark.parametrize("cc", [80, 90])
@pytest.mark.parametrize("dtype", C.DTYPES)
def test_defaults_are_in_the_compiled_space(cc, dtype):
    space = {name: {(c, br) for c, d, br in spec.compiled_space(cc) if d == dtype} for name, spec in REGISTRY.items()}
    for M, N, K in SHAPES:
        assert (LORA_MATMUL.default(dtype, cc, dict(N=N, K=K, layout="w", M=M)), None) in space["lora_matmul"]
        if cc >= 90 and dtype != "float32":
            for layout in ("w", "wT"):
                assert (LORA_MATMUL_TMA.default(dtype, cc, dict(N=N, K=K, layout=layout, M=M)), None) \
                    in space["lora_matmul_tma"]
        assert (MULTI_LORA_MATMUL.default(dtype, cc, dict(N=N, K=K, M=M)), None) in space["multi_lora_matmul"]
        if cc >= 90 and dtype != "float32":
            assert (MULTI_LORA_MATMUL_TMA.default(dtype, cc, dict(N=N, K=K, M=M)), None) \
                in space["multi_lora_matmul_tma"]
        assert (MULTI_LORA_SHRINK.default(dtype, cc, dict(K=K, M=M)), None) in space["multi_lora_shrink"], M
        for r in (1, 16, 17, 64, 128, 256):
            assert (MULTI_LORA_GRAD.default(dtype, cc, dict(D=K, R=r, M=M)), None) in space["multi_lora_grad"], r
            br = LORA_SHRINK.block_r(r)  # = LORA_DY's and LORA_X's
            assert (LORA_SHRINK.default(dtype, cc, dict(K=K, R=r, layout="a", M=M)), br) in space["lora_shrink"], \
                (M, K, r)
            assert (LORA_DY.default(dtype, cc, dict(N=N, R=r, M=M)), br) in space["lora_dy"], (M, N, r)
            assert (LORA_X.default(dtype, cc, dict(K=K, R=r, M=M)), br) in space["lora_x"], (M, K, r)
    for name in ("moe_gather", "moe_segment_sum"):
        for D in (64, 1000, 4096):
            assert (REGISTRY[name].default(dtype, cc, dict(D=D)), None) in space[name], (name, D)


@pytest.mark.parametrize("cc", [80, 90])
def test_pruning_respects_budget_and_dot_dims(cc):
    budget = C.SMEM_BYTES[cc]
    for d in C.DTYPES:
        for c in LORA_MATMUL.configs(d, cc):
            assert matmul_smem(c, d) <= budget
            assert min(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]) >= 16
        for br in LORA_SHRINK.block_rs():
            assert LORA_SHRINK.configs(d, cc, br), f"no shrink config for {d} R{br}"
            assert LORA_DY.configs(d, cc, br), f"no dY-pass config for {d} R{br}"
            assert LORA_X.configs(d, cc, br), f"no x-pass config for {d} R{br}"
        for c in LORA_MATMUL_TMA.configs(d, cc):
            assert cc >= 90 and d != "float32" and tma_smem(c, d) <= budget
    # The sm_90 kernel has a config for every 16-bit dtype there, and none below sm_90 or for fp32.
    assert bool(LORA_MATMUL_TMA.configs("bfloat16", cc)) == (cc >= 90)
    assert LORA_MATMUL_TMA.configs("float32", cc) == []
    # A config over budget is pruned.
    huge = C.Config.make(BLOCK_M=256, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4)
    assert prune_matmul([huge], "bfloat16", cc) == []
    tiny = C.Config.make(BLOCK_M=8, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=2)
    assert prune_matmul([tiny], "bfloat16", cc) == [], "dot dims < 16 must be pruned"


def test_rank_block():
    assert [C.rank_block(r) for r in (1, 16, 17, 64, 65, 256)] == [16, 16, 32, 64, 128, 256]
    assert C.MAX_RANK == C.RANK_BLOCKS[-1] == 256
    with pytest.raises(ValueError):
        C.rank_block(257)


def test_config_round_trip():
    c = C.Config.make(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    assert C.Config.from_dict(c.to_dict()) == c
    assert c.launch_kwargs() == {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_spec_matches_kernel_signature(name):
    """Each spec types every argument of its kernel (pointers, fp32 scalars,
    integers), gives every constexpr a value in each AOT variant, and names
    no argument the kernel lacks."""
    spec = REGISTRY[name]
    assert len(spec.variants) >= 2, "a forward and a backward (or second) layout"
    for cfg, dtype, block_r in spec.compiled_space(90)[:2]:
        spec.check_signature(cfg)
    names = [n for n, _ in spec.arguments()]
    assert set(spec.key) - {"layout"} <= set(names) | {"M", "R", "P", "D"}, spec.key


def test_spec_check_catches_drift():
    """A variant naming an argument the kernel lacks, or leaving a constexpr
    without a value, is rejected."""
    spec = LORA_MATMUL
    cfg = spec.compiled_space(90)[0][0]
    v = spec.variants[0]
    bad_name = AotVariant(v.name, {**v.pointers, "nope_ptr": "x"}, v.flags, v.ones, v.plain)
    with pytest.raises(ValueError, match="lacks"):
        KernelSpec(**{**spec.__dict__, "variants": (bad_name,)}).check_signature(cfg)
    no_flag = AotVariant(v.name, v.pointers, {k: x for k, x in v.flags.items() if k != "EVEN_K"}, v.ones, v.plain)
    with pytest.raises(ValueError, match="EVEN_K"):
        KernelSpec(**{**spec.__dict__, "variants": (no_flag,)}).check_signature(cfg)


@pytest.mark.parametrize("m_tiles,K,block_k,sms", [(4, 4096, 128, 132), (1, 4096, 128, 132), (64, 4096, 128, 132),
                                                   (132, 4096, 128, 132), (3, 40, 32, 4), (1, 97, 32, 4)])
def test_multi_lora_shrink_split_covers_k(m_tiles, K, block_k, sms):
    """The multi-LoRA shrink's K split: BLOCK_K-aligned pieces that cover K
    exactly once, about 2·SMs programs when row tiles are few, none when
    they are not."""
    from posttrain_kernels.ops.multi_lora.launch import shrink_split
    splits, per = shrink_split(m_tiles, K, block_k, sms)
    assert (splits - 1) * per < K <= splits * per
    if splits == 1:
        assert per == K and (m_tiles >= sms or K <= block_k)
    else:
        assert per % block_k == 0 and m_tiles < sms and m_tiles * splits <= 2 * sms + m_tiles
