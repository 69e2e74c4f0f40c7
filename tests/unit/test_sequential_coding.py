"""Sequential gradient coding (strategies/gradcode/sequential.py): the straggler model, the
schemes' guarantees and loads, the runtime model. Pure and fast, with no network and no torch."""
from __future__ import annotations

import copy
import itertools
from fractions import Fraction

import numpy as np
import pytest

from swarm_node.strategies.gradcode.sequential import (
    BurstyStragglerModel,
    DelayModel,
    GradientCodingScheme,
    MSGCSplit,
    MultiplexedSGC,
    SelectiveRepetitionSGC,
    conforms,
    gc_load,
    ideal_runtime_s,
    iid_trace,
    make_schemes,
    msgc_load_closed_form,
    no_stragglers,
    round_conforms,
    simulate_runtime,
    sr_sgc_s,
)

N = 16
PARAMS = [(1, 2, 2), (1, 3, 3), (2, 3, 2), (2, 4, 3), (3, 5, 4)]  # (B, W, lam)


def _clean(rounds: int, n: int = N) -> np.ndarray:
    return no_stragglers(n, rounds)


# --- the straggler model -----------------------------------------------------------------------

@pytest.mark.parametrize("B, W, lam", PARAMS)
def test_generator_output_conforms_and_uses_the_budget(B, W, lam):
    model = BurstyStragglerModel(B, W, lam)
    for seed in range(4):
        for p in (0.1, 0.5, 1.0):
            tr = model.trace(N, 60, seed=seed, p_start=p)
            ok, reason = model.conforms(tr)
            assert ok, reason
            assert tr.shape == (60, N) and tr.dtype == np.bool_
    # A saturated trace reaches λ distinct stragglers in some window, so the model is not being avoided
    tr = model.trace(N, 60, seed=0, p_start=1.0)
    assert max(int(tr[w:w + W].any(axis=0).sum()) for w in range(60 - W + 1)) == lam
    assert (model.trace(N, 30, seed=1) == model.trace(N, 30, seed=1)).all()
    assert (model.trace(N, 30, seed=1) != model.trace(N, 30, seed=2)).any()


def test_validator_rejects_too_many_distinct_stragglers_in_a_window():
    """1. λ workers straggle once each, in different rounds of one window: conforms.
    2. A (λ+1)-th worker in the same window: C1 is violated. Each burst is one round, so C2 holds.
    3. The same λ+1 workers spread so that no W-window holds all of them: conforms again.
    Result: C1 is checked on every sliding window, and only there."""
    B, W, lam = 1, 3, 2
    tr = _clean(10)
    tr[4, 0] = tr[5, 1] = True
    assert conforms(tr, B, W, lam) == (True, "ok")
    tr[6, 2] = True
    ok, reason = conforms(tr, B, W, lam)
    assert not ok and reason.startswith("C1") and "rounds 4..6" in reason
    tr[6, 2], tr[7, 2] = False, True  # rounds 4 and 7 are never in one window of 3
    assert conforms(tr, B, W, lam)[0]


def test_validator_rejects_a_burst_longer_than_B():
    B, W, lam = 2, 4, 3
    tr = _clean(10)
    tr[3:5, 7] = True  # a burst of exactly B rounds
    assert conforms(tr, B, W, lam)[0]
    tr[5, 7] = True  # B+1 consecutive rounds
    ok, reason = conforms(tr, B, W, lam)
    assert not ok and reason.startswith("C2") and "worker 7" in reason


def test_validator_rejects_two_bursts_in_one_window_and_allows_gaps_within_B():
    B, W, lam = 1, 4, 3
    tr = _clean(12)
    tr[2, 5] = tr[2 + W - 1, 5] = True  # W-1 apart: both in one window
    ok, reason = conforms(tr, B, W, lam)
    assert not ok and reason.startswith("C2")
    tr[2 + W - 1, 5], tr[2 + W, 5] = False, True  # W apart: never in one window
    assert conforms(tr, B, W, lam)[0]
    # B = 3: straggling in rounds 0 and 2 but not 1 lies inside one run of B rounds (module docstring)
    gap = _clean(8)
    gap[0, 1] = gap[2, 1] = True
    assert conforms(gap, 3, 5, 1)[0]


@pytest.mark.parametrize("kind, cond", [("distinct", "C1"), ("burst", "C2")])
def test_nonconforming_generator_breaks_the_requested_condition(kind, cond):
    model = BurstyStragglerModel(2, 3, 2)
    for seed in range(5):
        assert not model.conforms(model.nonconforming_trace(N, 30, seed=seed, kind=kind))[0]
        ok, reason = model.conforms(model.nonconforming_trace(N, 30, seed=seed, kind=kind, p_start=0.0))
        assert not ok and reason.startswith(cond)


def test_round_conforms_agrees_with_the_validator():
    model = BurstyStragglerModel(2, 4, 3)
    rng = np.random.default_rng(0)
    for seed in range(20):
        tr = model.nonconforming_trace(8, 12, seed=seed, kind="distinct" if seed % 2 else "burst")
        incremental = all(round_conforms(tr[:r], np.flatnonzero(tr[r]).tolist(), 2, 4, 3) for r in range(len(tr)))
        assert incremental == conforms(tr, 2, 4, 3)[0]
        tr = model.trace(8, 12, seed=int(rng.integers(1 << 30)), p_start=0.6)
        assert all(round_conforms(tr[:r], np.flatnonzero(tr[r]).tolist(), 2, 4, 3) for r in range(len(tr)))


@pytest.mark.parametrize("B, W, lam", [(0, 2, 1), (2, 2, 1), (3, 2, 1), (1, 2, -1), (True, 3, 1)])
def test_bad_model_parameters_are_rejected(B, W, lam):
    with pytest.raises(ValueError):
        BurstyStragglerModel(B, W, lam)


def test_bad_inputs_are_rejected_with_clear_errors():
    with pytest.raises(ValueError, match="lam < n"):
        MultiplexedSGC(4, 3, 1, 2, 4)
    with pytest.raises(ValueError, match="2-D"):
        conforms(np.zeros(5, dtype=bool), 1, 2, 1)
    sc = SelectiveRepetitionSGC(4, 2, 1, 2, 2)
    with pytest.raises(ValueError, match="workers"):
        sc.run(np.zeros((3, 5), dtype=bool))
    with pytest.raises(ValueError, match="straggler ids"):
        sc.step([4])
    sc.run(_clean(3, 4))
    with pytest.raises(RuntimeError, match="already played"):
        sc.step([])


# --- loads ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("B, W, lam, gc, sr, msgc", [
    (1, 2, 16, 17, 9, 1.89), (1, 3, 64, 65, 23, 1.49), (1, 9, 32, 33, 5, 1.12)])
def test_loads_match_the_reference_table_at_n_256(B, W, lam, gc, sr, msgc):
    n = 256
    g, s, m = make_schemes(n, 1, B, W, lam)
    assert g.load * n == gc and s.load * n == sr
    assert float(m.load * n) == pytest.approx(msgc, abs=0.005)
    assert (g.T, s.T, m.T) == (0, B, W - 2 + B)


@pytest.mark.parametrize("n", [4, 16, 256])
def test_loads_equal_the_closed_forms_built_from_task_sizes(n):
    for B, W in itertools.product(range(1, 4), range(2, 7)):
        if B >= W:
            continue
        for lam in (0, 1, 2, n - 1):
            sp = MSGCSplit(n, B, W, lam)
            assert sp.d1_fraction + sp.d2_fraction == 1  # the split covers the dataset exactly once
            assert sp.d2_task_size == sp.d1_chunk_size  # a slot fits either kind of mini-task
            assert sp.load == msgc_load_closed_form(n, B, W, lam) == MultiplexedSGC(n, 1, B, W, lam).load
            assert sr_sgc_s(B, W, lam) == -(-B * lam // (W - 1 + B)) <= lam
            assert SelectiveRepetitionSGC(n, 1, B, W, lam).load == Fraction(sr_sgc_s(B, W, lam) + 1, n)
            assert GradientCodingScheme(n, 1, lam).load == gc_load(n, lam) == Fraction(lam + 1, n)


# --- decoding on conforming traces --------------------------------------------------------------

@pytest.mark.parametrize("B, W, lam", PARAMS)
def test_every_job_decodes_by_its_deadline_on_conforming_traces(B, W, lam):
    J = 30
    model = BurstyStragglerModel(B, W, lam)
    for seed, p in itertools.product(range(4), (0.2, 1.0)):
        tr = model.trace(N, J + W + B, seed=seed, p_start=p)
        for sc in make_schemes(N, J, B, W, lam):
            res = sc.run(tr)
            assert res.deadline_misses == 0 and res.jobs_decoded == J, (sc.name, seed, p)
            assert all(t <= d <= t + sc.T for t, d in enumerate(res.decoded_round))
            if isinstance(sc, GradientCodingScheme):
                assert res.decoded_round == tuple(range(J))
            if isinstance(sc, MultiplexedSGC):  # D2 group B-1 is only computed in slot T
                assert res.decoded_round == tuple(t + sc.T for t in range(J))


@pytest.mark.parametrize("cls", [SelectiveRepetitionSGC, MultiplexedSGC])
def test_exhaustively_every_conforming_trace_of_a_tiny_case(cls):
    """1. n = 4, (B, W, λ) = (1, 2, 2), J = 3: depth-first over every round's straggler set that keeps
       the trace conforming, stepping a copy of the scheme each time.
    2. Count the complete traces.
    Result: no deadline is missed on any of them."""
    n, B, W, lam, J = 4, 1, 2, 2, 3
    sets = [c for k in range(n + 1) for c in itertools.combinations(range(n), k)]
    complete = 0

    def dfs(sc, hist):
        nonlocal complete
        if sc.done:
            complete += 1
            return
        for S in sets:
            if round_conforms(hist, S, B, W, lam):
                nxt = copy.deepcopy(sc)
                assert not nxt.step(S).missed, (hist.astype(int).tolist(), S)
                row = np.zeros((1, n), dtype=bool)
                row[0, list(S)] = True
                dfs(nxt, np.vstack([hist, row]))

    dfs(cls(n, J, B, W, lam), np.zeros((0, n), dtype=bool))
    assert complete > 100


@pytest.mark.parametrize("B, W, lam", PARAMS)
def test_work_per_round_is_exactly_the_load_and_tasks_follow_the_schedule(B, W, lam):
    J = 25
    tr = BurstyStragglerModel(B, W, lam).trace(N, J + W + B, seed=3, p_start=1.0)
    for sc in make_schemes(N, J, B, W, lam)[1:]:
        for r in range(sc.total_rounds):
            rep = sc.step(np.flatnonzero(tr[r]).tolist())
            steady = sc.T <= r < J if isinstance(sc, MultiplexedSGC) else r < J
            if steady:
                assert set(rep.work) == {sc.load}, (sc.name, r)
            for ts in rep.tasks:
                assert len({t.job for t in ts}) == len(ts)  # at most one task per job per worker per round
                for t in ts:
                    if isinstance(sc, SelectiveRepetitionSGC):
                        assert t.job == (r - B if t.repeat else r)
                    else:
                        assert r - sc.T <= t.job <= r and (t.kind == "d1" or not t.repeat)
        assert sc.repeats > 0  # a saturated trace forces the adaptive repeats to be used


def test_sr_sgc_redoes_with_the_round_t_stragglers_first():
    """1. n = 8, (B, W, λ) = (1, 2, 4): s = ceil(4/2) = 2.
    2. Round 0: workers 0..3 straggle, so v = 4 > s and v - s = 2 redos are needed in round 1.
    3. Round 1: no stragglers.
    Result: job 0 decodes in round 1 from 4 + 2 results, the redos are workers 0 and 1, and job 1
    is missing exactly those two, so it decodes in round 1 too (2 <= s)."""
    sc = SelectiveRepetitionSGC(8, 3, 1, 2, 4)
    assert sc.s == 2
    r0 = sc.step([0, 1, 2, 3])
    assert r0.decoded == () and r0.missed == ()
    r1 = sc.step([])
    assert [i for i, ts in enumerate(r1.tasks) if ts[0].repeat] == [0, 1]
    assert r1.decoded == (0, 1) and r1.repeats == 2


# --- non-conforming traces: misses and fallbacks, never a crash ----------------------------------

def test_nonconforming_traces_count_misses_instead_of_crashing():
    B, W, lam, J = 2, 3, 2, 20
    model = BurstyStragglerModel(B, W, lam)
    storm = _clean(J + W + B)
    storm[0:B + 1, :] = True  # everyone straggles in rounds 0..B: job 0 cannot decode in any scheme
    for tr in (storm, iid_trace(N, J + W + B, 0.4, seed=0),
               model.nonconforming_trace(N, J + W + B, seed=1, kind="burst", p_start=1.0)):
        for sc in make_schemes(N, J, B, W, lam, gc_rules=("le", "lt")):
            res = sc.run(tr)
            assert res.jobs_decoded + res.deadline_misses == J
    for sc in make_schemes(N, J, B, W, lam):
        res = sc.run(storm)
        assert res.decoded_round[0] is None and res.deadline_misses >= 1
    heavy = [sc.run(iid_trace(N, J + W + B, 0.4, seed=0)).deadline_misses for sc in make_schemes(N, J, B, W, lam)]
    assert min(heavy) > 0


def test_runtime_falls_back_to_waiting_for_everyone_on_nonconforming_traces():
    B, W, lam, J = 1, 3, 3, 30
    tr = iid_trace(N, J + W + B, 0.25, seed=2)
    d = DelayModel(base_s=0.1, compute_s=1.0, straggle_s=2.0)
    for sc in make_schemes(N, J, B, W, lam):
        out = simulate_runtime(sc, tr, d)
        assert out.run.deadline_misses == 0 and out.run.jobs_decoded == J
        assert out.fallbacks > 0
        assert out.runtime_s > ideal_runtime_s(sc, d) + (out.fallbacks - 1) * d.straggle_s


# --- the runtime model ---------------------------------------------------------------------------

@pytest.mark.parametrize("B, W, lam", PARAMS)
def test_runtime_orders_msgc_below_srsgc_below_gc_on_a_bursty_trace(B, W, lam):
    J = 40
    d = DelayModel(base_s=0.05, compute_s=1.0, straggle_s=1.0)
    tr = BurstyStragglerModel(B, W, lam).trace(N, J + W + B, seed=0, p_start=0.5)
    assert tr.any()
    gc, sr, ms = (simulate_runtime(sc, tr, d) for sc in make_schemes(N, J, B, W, lam))
    assert ms.runtime_s < sr.runtime_s < gc.runtime_s
    for out, sc in zip((gc, sr, ms), make_schemes(N, J, B, W, lam)):
        # On a conforming trace every scheme masks every straggler, so no round waits for one
        assert out.fallbacks == 0 and out.run.jobs_decoded == J
        ideal = ideal_runtime_s(sc, d)
        if isinstance(sc, SelectiveRepetitionSGC):
            # The only extra: the B trailing rounds in which redos of the last B jobs may run
            assert ideal - 1e-9 <= out.runtime_s <= ideal + B * (d.base_s + float(sc.load) * d.compute_s) + 1e-9
            assert out.round_s[:J] == pytest.approx([d.base_s + float(sc.load) * d.compute_s] * J)
        else:
            assert out.runtime_s == pytest.approx(ideal, rel=1e-12)


def test_gc_with_the_authors_strict_rule_falls_back_when_exactly_s_straggle():
    B, W, lam, J = 1, 3, 3, 40
    tr = BurstyStragglerModel(B, W, lam).trace(N, J, seed=0, p_start=1.0)
    full = sum(int(tr[r].sum()) == lam for r in range(J))
    assert full > 0
    d = DelayModel()
    out = simulate_runtime(GradientCodingScheme(N, J, lam, rule="lt"), tr, d)
    assert out.fallbacks >= full  # "< s" also fails rounds with fewer stragglers
    ideal = ideal_runtime_s(GradientCodingScheme(N, J, lam), d)
    assert out.runtime_s == pytest.approx(ideal + out.fallbacks * d.straggle_s)


@pytest.mark.parametrize("B, W, lam", PARAMS)
def test_no_stragglers_each_scheme_runs_at_its_own_ideal_time(B, W, lam):
    """With no stragglers no round ever waits, so each scheme's runtime is its closed form.
    For GC and SR-SGC that is J(base + load*c). For M-SGC it is (J+T)base + J*load*c.
    Setting c = 0 removes the load differences. GC and SR-SGC are then equal (J*base), and M-SGC
    pays only the T extra rounds of its pipeline ((J+T)*base)."""
    J = 40
    tr = no_stragglers(N, J + W + B)
    for c in (1.0, 0.0):
        d = DelayModel(base_s=0.05, compute_s=c, straggle_s=5.0)
        outs = [simulate_runtime(sc, tr, d) for sc in make_schemes(N, J, B, W, lam)]
        for out, sc in zip(outs, make_schemes(N, J, B, W, lam)):
            assert out.fallbacks == 0 and out.run.repeats == 0 and out.run.jobs_decoded == J
            assert out.runtime_s == pytest.approx(ideal_runtime_s(sc, d), rel=1e-12)
        if c == 0.0:
            gc, sr, ms = (o.runtime_s for o in outs)
            assert gc == pytest.approx(sr) == pytest.approx(J * d.base_s)
            assert ms == pytest.approx((J + W - 2 + B) * d.base_s)
    # The same runtime comes out whatever straggle_s is, because stragglers never cost anything here
    d1, d2 = DelayModel(straggle_s=0.0), DelayModel(straggle_s=9.0)
    for sc in make_schemes(N, J, B, W, lam):
        assert simulate_runtime(copy.deepcopy(sc), tr, d1).runtime_s == simulate_runtime(sc, tr, d2).runtime_s


def test_simulate_runtime_needs_a_fresh_scheme_and_is_deterministic():
    tr = BurstyStragglerModel(1, 2, 2).trace(N, 20, seed=4, p_start=0.7)
    a = simulate_runtime(MultiplexedSGC(N, 18, 1, 2, 2), tr, DelayModel())
    b = simulate_runtime(MultiplexedSGC(N, 18, 1, 2, 2), tr, DelayModel())
    assert a == b
    used = MultiplexedSGC(N, 18, 1, 2, 2)
    used.step([])
    with pytest.raises(ValueError, match="fresh"):
        simulate_runtime(used, tr, DelayModel())


def test_deadline_policy_matches_the_model_policy_where_the_model_holds():
    B, W, lam, J = 1, 3, 3, 30
    d = DelayModel(base_s=0.1, compute_s=1.0, straggle_s=2.0)
    bursty = BurstyStragglerModel(B, W, lam).trace(N, J + W + B, seed=5, p_start=0.8)
    noisy = iid_trace(N, J + W + B, 0.25, seed=2)
    for sc in make_schemes(N, J, B, W, lam):
        assert (simulate_runtime(copy.deepcopy(sc), bursty, d, policy="deadline")
                == simulate_runtime(copy.deepcopy(sc), bursty, d, policy="model"))
        opt = simulate_runtime(copy.deepcopy(sc), noisy, d, policy="deadline")
        assert opt.run.jobs_decoded + opt.run.deadline_misses == J  # misses may remain: lost results stay lost
        if isinstance(sc, GradientCodingScheme):  # GC's model is its decodability, so both policies agree
            assert opt == simulate_runtime(copy.deepcopy(sc), noisy, d, policy="model")
    with pytest.raises(ValueError, match="policy"):
        simulate_runtime(MultiplexedSGC(N, 2, 1, 2, 2), bursty, d, policy="never")  # type: ignore[arg-type]


def test_live_counters_match_the_run_result():
    tr = iid_trace(N, 30, 0.3, seed=7)
    for sc in make_schemes(N, 25, 1, 3, 3):
        res = sc.run(tr)
        assert (sc.jobs_decoded, sc.deadline_misses) == (res.jobs_decoded, res.deadline_misses)
