"""Robust combination (protocol/averaging/robust.py) against every payload a byzantine peer can
send an averaging path: x1000, sign-flipped, NaN/inf, wrong length, and a zero weight; plus the
per-peer suspicion ledger. No network: the reducers call `combine` exactly as tested here."""
from __future__ import annotations

import pytest
import torch

from swarm_node.protocol.averaging.robust import (Aggregation, AggregationRule, Combined, Contribution,
                                                  SuspicionLedger, combine, combine_lists, lower_median)

MEAN, CLIPPED, TRIMMED = (AggregationRule(m) for m in Aggregation)


def honest(k: int, n: int = 1000, seed: int = 0) -> list[torch.Tensor]:
    """k honest pseudo-gradients: one shared direction plus peer noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    return [base + 0.3 * torch.randn(n, generator=g) for _ in range(k)]


def parts(vectors: list[torch.Tensor]) -> list[Contribution]:
    return [Contribution(f"peer{i}", v) for i, v in enumerate(vectors)]


def clean_mean(k: int = 4) -> torch.Tensor:
    return torch.stack(honest(k)).mean(0)


ATTACKS = {
    "x1000": lambda h: 1000 * h[0],
    "sign_flipped_x10": lambda h: -10 * h[0],
    "sign_flipped": lambda h: -h[0],
}


def test_mean_is_the_weighted_mean_and_ignores_weight_zero():
    xs = honest(3)
    out = combine([Contribution("a", xs[0], 1), Contribution("b", xs[1], 3), Contribution("j", xs[2], 0)], MEAN)
    assert torch.allclose(out.result, (xs[0] + 3 * xs[1]) / 4)
    assert out.used == ("a", "b") and not out.clipped and not out.dropped


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_one_byzantine_in_five_moves_the_plain_mean_but_not_the_robust_ones(attack):
    h = honest(4)
    target = torch.stack(h).mean(0)
    bad = ATTACKS[attack](h)
    group = parts([*h, bad])
    err = {rule.mode.value: float(torch.linalg.vector_norm(combine(group, rule).result - target) /
                                  torch.linalg.vector_norm(target)) for rule in (MEAN, CLIPPED, TRIMMED)}
    # the clean spread: how far one honest peer alone is from the honest mean
    spread = float(torch.linalg.vector_norm(h[0] - target) / torch.linalg.vector_norm(target))
    if attack == "x1000":
        assert err["mean"] > 100
        assert err["clipped"] < 0.5 and err["trimmed"] < 0.5
    if attack == "sign_flipped_x10":
        assert err["mean"] > 2
        assert err["clipped"] < 0.6  # bounded to one honest norm: at most 2/5 of the way
    assert err["trimmed"] <= max(err["clipped"], spread) + 1e-6
    assert err["trimmed"] < 0.5


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_contribution_is_dropped_and_named(bad):
    h = honest(4)
    poisoned = h[0].clone()
    poisoned[17] = bad
    for rule in (CLIPPED, TRIMMED):
        out = combine(parts([*h[1:], poisoned]), rule)
        assert out.dropped == ("peer3",)
        assert "peer3" not in out.used and torch.isfinite(out.result).all()
    assert not torch.isfinite(combine(parts([*h[1:], poisoned]), MEAN).result).all()  # mean takes it in


def test_wrong_length_and_bad_weights_are_errors_not_results():
    h = honest(2)
    with pytest.raises(ValueError, match="expected 1000"):
        combine([Contribution("a", h[0]), Contribution("b", h[1][:999])], CLIPPED)
    with pytest.raises(ValueError):
        combine([Contribution("a", h[0], float("nan"))], CLIPPED)
    with pytest.raises(ValueError):
        combine([Contribution("a", h[0], -1.0)], TRIMMED)
    with pytest.raises(ValueError):
        combine([], MEAN)


def test_clean_contributions_are_not_clipped_beyond_the_median_and_trim_needs_three():
    h = honest(4)
    out = combine(parts(h), CLIPPED)
    assert len(out.clipped) <= 2  # at factor 1 only those above the lower median
    loose = combine(parts(h), AggregationRule(Aggregation.CLIPPED, clip_factor=3.0))
    assert loose.clipped == () and torch.allclose(loose.result, torch.stack(h).mean(0), atol=1e-6)
    two = combine(parts([h[0], 1000 * h[1]]), TRIMMED)
    assert not two.trimmed and two.clipped == ("peer1",)  # two bound each other by the smaller norm
    assert float(torch.linalg.vector_norm(two.result)) <= float(torch.linalg.vector_norm(h[0])) + 1e-3


def test_lower_median():
    assert lower_median([3.0, 1.0, 2.0]) == 2.0
    assert lower_median([5.0, 1.0]) == 1.0


def test_tensor_lists_are_judged_whole_and_split_back():
    g = torch.Generator().manual_seed(1)
    lists = [[torch.randn(3, 4, generator=g), torch.randn(5, generator=g)] for _ in range(4)]
    lists.append([-100 * t for t in lists[0]])
    pieces, out = combine_lists([(f"p{i}", ts, 1.0) for i, ts in enumerate(lists)], TRIMMED)
    assert [p.shape for p in pieces] == [(3, 4), (5,)]
    assert "p4" in out.clipped and out.trimmed
    with pytest.raises(ValueError, match="other shapes"):
        combine_lists([("a", [torch.zeros(2)], 1.0), ("b", [torch.zeros(3)], 1.0)], CLIPPED)


def test_a_peer_caught_repeatedly_is_suspected_and_an_honest_one_is_not():
    ledger = SuspicionLedger(window=5, threshold=3)
    newly = []
    for _ in range(4):
        newly += ledger.record(Combined(torch.zeros(1), used=("a", "b", "evil"), clipped=("evil",)))
    ledger.record(Combined(torch.zeros(1), used=("a", "b"), dropped=("nan",)))
    assert newly == ["evil"] and ledger.suspected() == ["evil"]
    assert ledger.totals[("evil", "clipped")] == 4 and ledger.totals[("nan", "dropped")] == 1
    for _ in range(5):
        ledger.record(Combined(torch.zeros(1), used=("a", "b", "evil")))
    assert ledger.suspected() == []  # it behaved for a whole window
