"""Routing metadata, checked exactly: expert choice, top-K with capacity,
capacity from a factor, routing groups, auxiliary losses."""
import math

import pytest
import torch

import posttrain_kernels as pk


def _logits(n, E, seed=0):
    return torch.randn(n, E, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n,E,C", [
    pytest.param(37, 4, 10, id="n37-E4-C10"),
    pytest.param(3, 8, 2, id="n<E"),  # fewer tokens than experts
    pytest.param(5, 3, 9, id="capacity>n"),  # extra slots stay empty
    pytest.param(1, 4, 1, id="single-token"),
    pytest.param(64, 8, 64, id="capacity=n"),  # every expert takes every token
])
def test_expert_choice_metadata(n, E, C):
    logits = _logits(n, E)
    gates, idx = pk.expert_choice_route(logits, C)
    assert gates.shape == (E, C) and idx.shape == (E, C) and idx.dtype == torch.int64
    assert gates.dtype == torch.float32
    probs = torch.softmax(logits.float(), -1)
    take = min(C, n)
    for e in range(E):
        held = idx[e, :take].tolist()
        assert len(set(held)) == take, f"expert {e} holds repeated tokens"
        assert all(0 <= t < n for t in held)
        assert (idx[e, take:] == -1).all() and (gates[e, take:] == 0).all(), "padding slots must be empty"
        # exactly the top-`take` tokens, in descending probability
        expected = torch.sort(probs[:, e], descending=True, stable=True).indices[:take]
        assert held == expected.tolist(), f"expert {e} picked the wrong tokens"
        torch.testing.assert_close(gates[e, :take], probs[held, e], rtol=0, atol=0)


def test_expert_choice_ties_go_to_lower_token():
    logits = torch.zeros(6, 2)  # every probability equal
    _, idx = pk.expert_choice_route(logits, 3)
    assert idx.tolist() == [[0, 1, 2], [0, 1, 2]]


def test_expert_choice_groups():
    n, E, g, C = 24, 3, 8, 4
    logits = _logits(n, E, seed=1)
    gates, idx = pk.expert_choice_route(logits, C, group_size=g)
    assert idx.shape == (E, (n // g) * C)
    for G in range(n // g):
        sub_g, sub_i = pk.expert_choice_route(logits[G * g:(G + 1) * g], C)
        assert torch.equal(idx[:, G * C:(G + 1) * C], sub_i + G * g), f"group {G}"
        assert torch.equal(gates[:, G * C:(G + 1) * C], sub_g)
    with pytest.raises(ValueError, match="^group_size"):
        pk.expert_choice_route(logits, C, group_size=5)


@pytest.mark.parametrize("n,E,K,C", [
    pytest.param(37, 4, 2, 10, id="n37-E4-K2-C10"),  # some assignments dropped
    pytest.param(40, 8, 1, 5, id="K1"),
    pytest.param(9, 4, 2, 9, id="no-drops"),  # capacity = n: nothing dropped
    pytest.param(1, 4, 2, 1, id="single-token"),
    pytest.param(6, 3, 3, 2, id="K=E"),
])
@pytest.mark.parametrize("drop_order", ["position", "probability"])
def test_topk_metadata(n, E, K, C, drop_order):
    logits = _logits(n, E, seed=2)
    gates, idx = pk.topk_route(logits, K, C, drop_order=drop_order)
    assert idx.shape == (E, C) and gates.shape == (E, C)
    probs = torch.softmax(logits.float(), -1)
    topv, topi = torch.topk(probs, K, -1)
    # Reference placement, a plain loop: choice rank first, then token order
    # or descending top-1 probability (ties by position).
    tokens = sorted(range(n), key=lambda t: -topv[t, 0].item()) if drop_order == "probability" else range(n)
    topv = topv / topv.sum(-1, keepdim=True)
    expected = [[] for _ in range(E)]
    for k in range(K):
        for t in tokens:
            e = topi[t, k].item()
            if len(expected[e]) < C:
                expected[e].append((t, topv[t, k].item()))
    per_token = torch.zeros(n, dtype=torch.int64)
    for e in range(E):
        held = [t for t in idx[e].tolist() if t >= 0]
        assert held == [t for t, _ in expected[e]], f"expert {e}: slots {held}"
        assert (idx[e, len(held):] == -1).all(), "kept slots are packed at the front"
        assert len(held) <= C, "capacity respected"
        assert torch.allclose(gates[e, :len(held)], torch.tensor([v for _, v in expected[e]]))
        for t in held:
            per_token[t] += 1
    assert (per_token <= K).all(), "at most K slots per token"
    if C >= n:
        assert (per_token == K).all(), "no drops when capacity >= n"


def test_topk_every_token_prefers_one_expert():
    n, E, C = 12, 4, 5
    logits = torch.zeros(n, E)
    logits[:, 2] = 5.0  # everyone's first choice is expert 2
    gates, idx = pk.topk_route(logits, 1, C)
    assert idx[2].tolist() == [0, 1, 2, 3, 4], "the first C tokens win, by position"
    assert (idx[[0, 1, 3]] == -1).all()


def test_topk_probability_order_keeps_the_most_confident_tokens():
    """Every token's first choice is expert 0, with confidence rising with
    the token index: by probability the last C tokens keep their slot, by
    position the first C."""
    n, E, C = 10, 3, 4
    logits = torch.zeros(n, E)
    logits[:, 0] = torch.linspace(1.0, 4.0, n)
    _, by_prob = pk.topk_route(logits, 1, C, drop_order="probability")
    _, by_pos = pk.topk_route(logits, 1, C)
    assert by_prob[0].tolist() == [9, 8, 7, 6]
    assert by_pos[0].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="^drop_order"):
        pk.topk_route(logits, 1, C, drop_order="random")


def test_topk_groups_and_errors():
    logits = _logits(16, 4, seed=3)
    for order in ("position", "probability"):
        gates, idx = pk.topk_route(logits, 2, 3, group_size=8, drop_order=order)
        a_g, a_i = pk.topk_route(logits[8:], 2, 3, drop_order=order)
        assert torch.equal(idx[:, 3:], torch.where(a_i >= 0, a_i + 8, a_i)), order
        assert torch.equal(gates[:, 3:], a_g), order
    with pytest.raises(ValueError, match="^top_k"):
        pk.topk_route(logits, 5, 3)
    with pytest.raises(ValueError, match="^capacity"):
        pk.topk_route(logits, 2, 0)
    with pytest.raises(ValueError, match="^router_logits"):
        pk.topk_route(logits[None], 2, 3)


def test_capacity_from_factor():
    assert pk.capacity_from_factor(8192, 8, 2.0) == 2048  # T = C·n/E
    assert pk.capacity_from_factor(10, 3, 1.0) == 4  # rounded up
    assert pk.capacity_from_factor(8192, 8, 1.25, top_k=2) == math.ceil(1.25 * 2 * 8192 / 8)
    assert pk.capacity_from_factor(100, 8, 1.0, multiple_of=16) == 16
    assert pk.capacity_from_factor(64, 8, 8.0) == 64  # C = E: every token
    with pytest.raises(ValueError):
        pk.capacity_from_factor(10, 0, 1.0)


def test_aux_losses():
    uniform = torch.zeros(32, 4)
    assert pk.router_z_loss(uniform).item() == pytest.approx(math.log(4) ** 2)
    skewed = torch.zeros(32, 4)
    skewed[:, 0] = 10.0
    assert pk.load_balancing_loss(skewed, 1).item() == pytest.approx(4.0, rel=1e-3)  # all to one expert
    balanced = torch.eye(4).repeat(8, 1) * 10
    assert pk.load_balancing_loss(balanced, 1).item() == pytest.approx(1.0, rel=1e-3)
    logits = torch.randn(16, 4, requires_grad=True)
    (pk.router_z_loss(logits) + pk.load_balancing_loss(logits, 2)).backward()
    assert torch.isfinite(logits.grad).all()
