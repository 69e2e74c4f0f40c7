"""Gradient codes as pure math: every straggler pattern of size <= s
decodes to the full gradient sum; the guards refuse ill-conditioned decodes; coded SGD with
random stragglers equals wait-for-all SGD step for step."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from swarm_node.strategies.gradcode.codes import (
    NotDecodable, build_code, combine, resolve_scheme, worst_coefficient,
)


def _partials(n: int, dim: int, dtype, seed: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(dim, generator=g, dtype=dtype), torch.randn(3, 2, generator=g, dtype=dtype)]
            for _ in range(n)]


def _encode(code, partials):
    """f_i = sum_j B[i, j] g_j for every worker, in the partials' dtype."""
    out = {}
    for i in range(code.n):
        f = [torch.zeros_like(t) for t in partials[0]]
        for j, w in code.support(i):
            for acc, t in zip(f, partials[j]):
                acc.add_(t, alpha=w)
        out[i] = f
    return out


def _rel_err(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    num = math.sqrt(sum(float(((a.double() - b.double()) ** 2).sum()) for a, b in zip(got, want)))
    den = math.sqrt(sum(float((b.double() ** 2).sum()) for b in want))
    return num / den


@pytest.mark.parametrize("s", [1, 2])
def test_frc_decodes_every_pattern_exactly(s):
    """n = 6, every set of <= s stragglers; fp32 error <= 1e-6, fp64 <= 1e-12."""
    n = 6
    code = build_code("frc", n, s)
    assert code.scheme == "frc" and code.redundancy == (s + 1) / n
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-12)):
        partials = _partials(n, 50, dtype, seed=s)
        want = [sum(p[k] for p in partials) for k in range(2)]
        coded = _encode(code, partials)
        for k in range(s + 1):
            for missing in itertools.combinations(range(n), k):
                avail = [i for i in range(n) if i not in missing]
                dec = code.decoding(avail)
                got = combine(dec, {i: coded[i] for i in avail}, dtype)
                err = max(float((a.double() - b.double()).abs().max()) for a, b in zip(got, want))
                assert err <= tol * max(1.0, max(float(b.abs().max()) for b in want)), (missing, err)


def test_frc_refuses_a_missing_group():
    code = build_code("frc", 6, 1)  # groups {0,1}, {2,3}, {4,5}
    with pytest.raises(NotDecodable) as e:
        code.decoding([0, 1, 4, 5])
    assert e.value.reason == "insufficient"
    code.decoding([1, 2, 5])  # one per group suffices, fewer than n - s replies


@pytest.mark.parametrize("n", range(4, 11))
@pytest.mark.parametrize("s", [1, 2, 3])
def test_cyclic_decodes_every_pattern_in_float64(n, s):
    """All C(n, s) patterns, fp64 relative error <= 1e-8 (n need not divide by s+1)."""
    if s >= n:
        pytest.skip("s < n required")
    code = build_code("cyclic", n, s, seed=0)
    partials = _partials(n, 40, torch.float64, seed=n * 10 + s)
    want = [sum(p[k] for p in partials) for k in range(2)]
    coded = _encode(code, partials)
    for row in range(n):  # cyclic band: worker i holds i..i+s
        assert [j for j, _ in code.support(row)] == sorted((row + k) % n for k in range(s + 1))
    for missing in itertools.combinations(range(n), s):
        avail = [i for i in range(n) if i not in missing]
        dec = code.decoding(avail)
        assert dec.max_coefficient <= 1e4 and dec.residual <= 1e-8
        assert _rel_err(combine(dec, {i: coded[i] for i in avail}, torch.float64), want) <= 1e-8, missing


def test_cyclic_asks_for_more_when_ill_conditioned_and_all_replies_shrink_coefficients():
    """A decode whose max |a| exceeds the bound is refused (wait for one more reply);
    with every reply the minimum-norm coefficients are no larger than with n - s."""
    code = build_code("cyclic", 7, 2, seed=3)
    avail = [0, 1, 2, 3, 4]
    ok = code.decoding(avail)
    with pytest.raises(NotDecodable) as e:
        code.decoding(avail, max_coefficient=ok.max_coefficient / 2)
    assert e.value.reason == "ill_conditioned"
    with pytest.raises(NotDecodable) as e:
        code.decoding([0, 1, 2, 3])
    assert e.value.reason == "insufficient"
    for missing in itertools.combinations(range(7), 2):
        sub = code.decoding([i for i in range(7) if i not in missing])
        full = code.decoding(range(7))
        norm = lambda d: math.sqrt(sum(c * c for c in d.coefficients.values()))  # noqa: E731
        assert norm(full) <= norm(sub) + 1e-9


def test_construction_is_deterministic_and_picks_the_best_candidate():
    a, b = build_code.__wrapped__("cyclic", 9, 2, 5), build_code.__wrapped__("cyclic", 9, 2, 5)
    assert np.array_equal(a.matrix, b.matrix)
    assert not np.array_equal(a.matrix, build_code.__wrapped__("cyclic", 9, 2, 6).matrix)
    assert worst_coefficient(a) < 1e4


def test_scheme_resolution():
    assert resolve_scheme("auto", 4, 1) == ("frc", 1)
    assert resolve_scheme("auto", 5, 1) == ("cyclic", 1)
    assert resolve_scheme("frc", 3, 5) == ("frc", 2)  # s capped at n-1: full replication
    assert resolve_scheme("cyclic", 1, 1) == ("none", 0)
    assert resolve_scheme("none", 8, 3) == ("none", 0)
    with pytest.raises(ValueError, match="needs \\(s\\+1\\) \\| n"):
        resolve_scheme("frc", 5, 1)
    with pytest.raises(ValueError, match="unknown"):
        resolve_scheme("mds", 5, 1)


@pytest.mark.parametrize("scheme", ["frc", "cyclic"])
def test_coded_sgd_equals_wait_for_all(scheme):
    """Logistic regression, 4 workers, s = 1, one random straggler dropped per step,
    SGD for 100 steps: parameters equal the wait-for-all run to 1e-5 (float64)."""
    n, dim, per_part = 4, 6, 16
    g = torch.Generator().manual_seed(0)
    w_true = torch.randn(dim, generator=g, dtype=torch.float64)
    code = build_code(scheme, n, 1, seed=1)
    rng = np.random.default_rng(0)

    def partition_grad(w, step, j):
        gj = torch.Generator().manual_seed(step * 1000 + j)
        x = torch.randn(per_part, dim, generator=gj, dtype=torch.float64)
        y = (x @ w_true > 0).double()
        p = torch.sigmoid(x @ w)
        return [x.T @ (p - y) / per_part]

    w_coded = torch.zeros(dim, dtype=torch.float64)
    w_all = torch.zeros(dim, dtype=torch.float64)
    for step in range(100):
        full = sum(partition_grad(w_all, step, j)[0] for j in range(n)) / n
        w_all -= 0.5 * full
        straggler = int(rng.integers(n))
        coded = {}
        for i in range(n):
            if i == straggler:
                continue
            f = torch.zeros(dim, dtype=torch.float64)
            for j, wt in code.support(i):
                f += wt * partition_grad(w_coded, step, j)[0]
            coded[i] = [f]
        dec = code.decoding(sorted(coded))
        w_coded -= 0.5 * combine(dec, coded, torch.float64)[0] / n
    assert torch.allclose(w_coded, w_all, atol=1e-5, rtol=0)
    assert float((w_all - torch.zeros(dim)).abs().max()) > 0.1  # it really trained
