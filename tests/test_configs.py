"""Config spaces and default picks (no compile): pruning rules, and every
default the launchers pick on a GPU is a member of the pruned space that the
ahead-of-time test compiles."""
import pytest

from posttrain_kernels.autotune import configs as C

SHAPES = [(1, 4096, 4096), (64, 4096, 4096), (300, 1024, 512), (8192, 4096, 4096), (8192, 14336, 4096)]


@pytest.mark.parametrize("cc", [80, 90])
@pytest.mark.parametrize("dtype", C.DTYPES)
def test_defaults_are_in_the_compiled_space(cc, dtype):
    space = C.all_spaces(cc)
    matmul = {c for c, d, _ in space["lora_matmul"] if d == dtype}
    shrink = {(c, br) for c, d, br in space["lora_shrink"] if d == dtype}
    grad = {(c, br) for c, d, br in space["lora_grad"] if d == dtype}
    mlora_grad = {c for c, d, _ in space["mlora_grad"] if d == dtype}
    mlora_shrink = {c for c, d, _ in space["mlora_shrink"] if d == dtype}
    for M, N, K in SHAPES:
        assert C.default_lora_matmul(M, N, K, dtype, cc) in matmul, (M, N, K)
        assert C.default_mlora_shrink(M, dtype, cc) in mlora_shrink, M
        for r in (1, 16, 17, 64, 128, 256):
            assert C.default_mlora_grad(r, dtype, cc) in mlora_grad, r
        for r in (1, 16, 17, 64, 128, 256):
            br = C.rank_block(r)
            assert (C.default_lora_shrink(M, K, br, dtype, cc), br) in shrink, (M, K, r)
            assert (C.default_lora_grad(M, N, br, dtype, cc), br) in grad, (M, N, r)


@pytest.mark.parametrize("cc", [80, 90])
def test_pruning_respects_budget_and_dot_dims(cc):
    budget = C.SMEM_BYTES[cc]
    for d in C.DTYPES:
        for c in C.prune_lora_matmul(C.lora_matmul_space(d), d, cc):
            assert C.lora_matmul_smem(c, d) <= budget
            assert min(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]) >= 16
        for br in C.RANK_BLOCKS:
            assert C.prune_lora_shrink(C.lora_shrink_space(d), br, d, cc), f"no shrink config for {d} R{br}"
            assert C.prune_lora_grad(C.lora_grad_space(d), br, d, cc), f"no grad config for {d} R{br}"
    # A config over budget is pruned.
    huge = C.Config.make(BLOCK_M=256, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4)
    assert C.prune_lora_matmul([huge], "bfloat16", cc) == []
    tiny = C.Config.make(BLOCK_M=8, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=2)
    assert C.prune_lora_matmul([tiny], "bfloat16", cc) == [], "dot dims < 16 must be pruned"


def test_rank_block():
    assert [C.rank_block(r) for r in (1, 16, 17, 64, 65, 256)] == [16, 16, 32, 64, 128, 256]
    with pytest.raises(ValueError):
        C.rank_block(257)


def test_config_round_trip():
    c = C.Config.make(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    assert C.Config.from_dict(c.to_dict()) == c
    assert c.launch_kwargs() == {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}


@pytest.mark.parametrize("m_tiles,K,block_k,sms", [(4, 4096, 128, 132), (1, 4096, 128, 132), (64, 4096, 128, 132),
                                                   (132, 4096, 128, 132), (3, 40, 32, 4), (1, 97, 32, 4)])
def test_mlora_shrink_split_covers_k(m_tiles, K, block_k, sms):
    """The multi-LoRA shrink's K split: BLOCK_K-aligned pieces that cover K
    exactly once, about 2·SMs programs when row tiles are few, none when
    they are not."""
    from posttrain_kernels.ops.multi_lora import shrink_split
    splits, per = shrink_split(m_tiles, K, block_k, sms)
    assert (splits - 1) * per < K <= splits * per
    if splits == 1:
        assert per == K and (m_tiles >= sms or K <= block_k)
    else:
        assert per % block_k == 0 and m_tiles < sms and m_tiles * splits <= 2 * sms + m_tiles
