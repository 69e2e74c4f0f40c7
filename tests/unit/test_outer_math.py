"""DiLoCo-family tensor math (strategies/lowcomm/outer_math.py): golden values, NoLoCo, Streaming
DiLoCo, weighted means, save/load, plus pairing and digests."""
from __future__ import annotations

import copy
import io

import pytest
import torch

from swarm_node.strategies.lowcomm.outer_math import (
    OuterOptimizer,
    fragment_apply_due,
    fragment_due,
    layer_fragments,
    layer_of,
    heavy_ball_step,
    merge,
    noloco_update,
    pair_peers,
    pairing_seed,
    pseudo_gradient,
    replica_spread,
    round_digest,
    validate_streaming,
    weighted_mean,
)

torch.set_num_threads(1)


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _rand_list(seed: int, shapes=((3, 4), (5,), ())) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Bit-identical lists (dtype, shape and raw bytes)."""
    return len(a) == len(b) and round_digest(a, 64) == round_digest(b, 64)


# ---------------------------------------------------------------- basics


def test_pseudo_gradient_sign_dtype_and_no_aliasing():
    phi, theta = [_t(1.0, 2.0)], [torch.tensor([0.75, 2.5], dtype=torch.bfloat16)]
    d = pseudo_gradient(phi, theta)
    assert d[0].dtype == torch.float32 and d[0].tolist() == [0.25, -0.5]  # phi - theta
    d[0] += 1
    assert phi[0].tolist() == [1.0, 2.0] and theta[0].tolist() == [0.75, 2.5]
    with pytest.raises(ValueError):
        pseudo_gradient(phi, theta + theta)
    with pytest.raises(ValueError):
        pseudo_gradient(phi, [_t(1.0, 2.0, 3.0)])


def test_weighted_mean_divides_by_total_weight_and_accumulates_in_fp32():
    out = weighted_mean([([_t(1.0, 2.0)], 1), ([_t(4.0, 8.0)], 3)])
    assert out[0].tolist() == [3.25, 6.5]  # (1*1 + 3*4) / 4, not / 2
    # 16-bit inputs: the mean is fp32, not rounded to the inputs' dtype
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(1000, generator=g).to(torch.bfloat16) for _ in range(5)]
    out = weighted_mean([([x], 1.0) for x in xs])[0]
    ref = torch.stack([x.double() for x in xs]).mean(0)
    assert out.dtype == torch.float32
    assert (out.double() - ref).abs().max().item() < 1e-6
    assert (out.to(torch.bfloat16).double() - ref).abs().max().item() > 1e-4  # bf16 would not do


@pytest.mark.parametrize("payloads", [
    [],
    [([_t(1.0)], 0), ([_t(2.0)], 0.0)],
    [([_t(1.0)], -1.0), ([_t(2.0)], 2.0)],
    [([_t(1.0)], float("nan"))],
    [([_t(1.0)], float("inf"))],
    [([_t(1.0)], 1), ([_t(1.0, 2.0)], 1)],
    [([_t(1.0)], 1), ([_t(1.0), _t(1.0)], 1)],
])
def test_weighted_mean_rejects_bad_input(payloads):
    with pytest.raises(ValueError):
        weighted_mean(payloads)


def test_u6_weight_zero_joiner_leaves_the_mean_unchanged():
    a, b = _rand_list(1), _rand_list(2)
    joiner = [torch.full_like(x, float("inf")) for x in a]  # a weight-0 payload is not even read
    base = weighted_mean([(a, 64), (b, 32)])
    with_joiner = weighted_mean([(a, 64), (joiner, 0), (b, 32)])
    assert _same(base, with_joiner)
    # dividing by the count (3) instead of the total weight would be visibly wrong
    by_count = [(x * 64 + y * 32) / 3 for x, y in zip(a, b)]
    assert not torch.allclose(with_joiner[0], by_count[0])
    # the same holds for pseudo-gradients: a joiner at theta = phi sends a zero delta
    phi = _rand_list(3)
    deltas = [pseudo_gradient(phi, _rand_list(s)) for s in (4, 5)]
    d_join = pseudo_gradient(phi, phi)
    assert all(not bool(x.any()) for x in d_join)
    assert _same(weighted_mean([(deltas[0], 1), (deltas[1], 1)]),
                 weighted_mean([(deltas[0], 1), (d_join, 0), (deltas[1], 1)]))


# ---------------------------------------------------------------- DiLoCo golden values


def test_u1_diloco_golden_values_and_theta_reset():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    outer = OuterOptimizer([model.weight])  # defaults: lr 0.7, momentum 0.9, Nesterov
    assert outer.hyperparameters == {"lr": 0.7, "momentum": 0.9, "nesterov": True}
    phi = outer.phi

    def round_(thetas):
        deltas = [pseudo_gradient(phi, [torch.full((1, 1), th)]) for th in thetas]
        mean = weighted_mean([(d, 1.0) for d in deltas])
        new_phi = outer.step(mean)
        with torch.no_grad():  # theta_i <- phi on every member
            model.weight.copy_(new_phi[0])
        return mean[0].item(), new_phi

    mean, phi = round_((0.8, 0.6))
    assert mean == pytest.approx(0.3, abs=1e-6)
    assert phi[0].item() == pytest.approx(0.601, abs=1e-6)
    assert model.weight.item() == phi[0].item()  # theta reset to phi, bit for bit
    assert round_digest([model.weight]) == round_digest(phi)

    mean, phi = round_((0.501, 0.401))
    assert mean == pytest.approx(0.15, abs=1e-6)
    assert outer.state_dict()["optimizer"]["state"][0]["momentum_buffer"].item() == pytest.approx(0.42, abs=1e-6)
    assert phi[0].item() == pytest.approx(0.2314, abs=1e-6)
    assert model.weight.item() == phi[0].item()


def test_outer_optimizer_matches_nesterov_formula_and_copies_its_inputs():
    phi0, d1, d2 = _rand_list(10), _rand_list(11), _rand_list(12)
    keep = [x.clone() for x in phi0 + d1]
    outer = OuterOptimizer(phi0, lr=0.7, momentum=0.9)
    p1 = outer.step(d1)
    p1[0] += 100  # returned phi is a copy: does not leak into the optimizer
    p2 = outer.step(d2)
    assert _same(phi0 + d1, keep)  # inputs untouched
    for p, a, b, out in zip(phi0, d1, d2, p2):
        p, a, b = p.double(), a.double(), b.double()
        p = p - 0.7 * (a + 0.9 * a)  # b1 = a
        buf = 0.9 * a + b
        p = p - 0.7 * (b + 0.9 * buf)
        torch.testing.assert_close(out.double(), p, atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        outer.step(d1[:2])
    with pytest.raises(ValueError):
        outer.step([torch.full_like(x, float("nan")) for x in d1])


# ---------------------------------------------------------------- save / load


def test_u7_outer_optimizer_save_load_continues_bit_identically():
    deltas = [_rand_list(100 + r) for r in range(5)]
    a = OuterOptimizer(_rand_list(7))
    for d in deltas[:2]:
        a.step(d)
    saved = a.state_dict()
    buf = io.BytesIO()
    torch.save(saved, buf)  # as in a checkpoint / join snapshot
    snapshot_digest = round_digest(saved["phi"] + [saved["optimizer"]["state"][i]["momentum_buffer"] for i in range(3)])

    cont_a = [a.step(d) for d in deltas[2:]]
    # the saved dict is a snapshot: continuing `a` did not change it
    assert snapshot_digest == round_digest(
        saved["phi"] + [saved["optimizer"]["state"][i]["momentum_buffer"] for i in range(3)])

    b = OuterOptimizer([torch.zeros_like(x) for x in _rand_list(7)], lr=0.1, momentum=0.5, nesterov=False)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert b.hyperparameters == {"lr": 0.7, "momentum": 0.9, "nesterov": True}
    cont_b = [b.step(d) for d in deltas[2:]]
    assert len(cont_b) == 3 and all(_same(x, y) for x, y in zip(cont_a, cont_b))

    # loading the in-memory dict does not alias it either: stepping d leaves `saved` intact
    d = OuterOptimizer(_rand_list(7))
    d.load_state_dict(saved)
    assert _same(d.step(deltas[2]), cont_a[0])
    assert snapshot_digest == round_digest(
        saved["phi"] + [saved["optimizer"]["state"][i]["momentum_buffer"] for i in range(3)])

    # negative control: same phi but the momentum lost -> a different trajectory
    c = OuterOptimizer(saved["phi"])
    assert not _same(c.step(deltas[2]), cont_a[0])


def test_u7_load_state_dict_rejects_mismatched_shapes_without_changing_anything():
    a = OuterOptimizer(_rand_list(1))
    a.step(_rand_list(2))
    good = a.state_dict()
    b = OuterOptimizer(_rand_list(3))
    before = b.state_dict()
    bad_phi = dict(good, phi=[torch.zeros(2)] + good["phi"][1:])
    bad_mom = copy.deepcopy(good)
    bad_mom["optimizer"]["state"][1]["momentum_buffer"] = torch.zeros(7)
    for bad in (bad_phi, bad_mom, dict(good, phi=good["phi"][:2])):
        with pytest.raises(ValueError):
            b.load_state_dict(bad)
        assert _same(b.phi, before["phi"]) and b.state_dict()["optimizer"]["state"] == {}


# ---------------------------------------------------------------- NoLoCo


@pytest.mark.parametrize("gamma,expected", [(0.7, (0.79, 0.76)), (0.35, (0.8075, 0.7425))])
def test_u2_noloco_golden_values(gamma, expected):
    phis, thetas = [[_t(1.0)], [_t(0.9)]], [[_t(0.8)], [_t(0.6)]]
    for i in range(2):
        new_phi, new_delta = noloco_update(phis[i], None, phis, thetas, lr=0.7, gamma=gamma, beta=0.5)
        assert new_phi[0].item() == pytest.approx(expected[i], abs=1e-6)
        assert new_delta[0].item() == pytest.approx(expected[i] - phis[i][0].item(), abs=1e-6)


def test_u2_noloco_general_gamma_matches_the_formula_and_touches_no_input():
    lr, gamma, beta = 0.6, 0.23, 0.45
    group_phis = [_rand_list(s) for s in (1, 2, 3)]
    group_thetas = [_rand_list(s) for s in (4, 5, 6)]
    delta = _rand_list(7)
    inputs = [x.clone() for x in sum(group_phis + group_thetas, []) + delta]
    for i in range(3):
        new_phi, new_delta = noloco_update(group_phis[i], delta, group_phis, group_thetas,
                                           lr=lr, gamma=gamma, beta=beta)
        for k in range(3):
            ps = torch.stack([p[k].double() for p in group_phis])
            ts = torch.stack([t[k].double() for t in group_thetas])
            d = beta * delta[k].double() - lr * (ps - ts).mean(0) - gamma * (ps[i] - ps.mean(0))
            torch.testing.assert_close(new_delta[k].double(), d, atol=1e-6, rtol=0)
            torch.testing.assert_close(new_phi[k].double(), ps[i] + d, atol=1e-6, rtol=0)
    assert _same(sum(group_phis + group_thetas, []) + delta, inputs)
    with pytest.raises(ValueError):
        noloco_update(group_phis[0], None, group_phis, group_thetas[:2], lr=lr, gamma=gamma, beta=beta)


def test_heavy_ball_step_equals_torch_sgd_without_nesterov():
    phi = _rand_list(20)
    sgd = OuterOptimizer(phi, lr=0.7, momentum=0.5, nesterov=False)
    mom = None
    for r in range(3):
        d = _rand_list(30 + r)
        phi, mom = heavy_ball_step(phi, mom, d, lr=0.7, beta=0.5)
        ref = sgd.step(d)
        for x, y in zip(phi, ref):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


def _noloco_swarm(groups: list[list[int]], rounds: int = 3):
    """NoLoCo peers from an identical phi; each round every peer drifts differently."""
    n = max(max(g) for g in groups) + 1
    phis = [_rand_list(0) for _ in range(n)]
    deltas: list[list[torch.Tensor] | None] = [None] * n
    history = []
    for r in range(rounds):
        thetas = [[p - 0.1 * z for p, z in zip(phis[i], _rand_list(1000 * r + i))] for i in range(n)]
        new = [None] * n
        for g in groups:
            for i in g:
                new[i] = noloco_update(phis[i], deltas[i], [phis[j] for j in g], [thetas[j] for j in g],
                                       lr=0.7, gamma=0.7, beta=0.5)
        phis, deltas = [x[0] for x in new], [x[1] for x in new]
        history.append((thetas, phis))
    return history


@pytest.mark.parametrize("n", [3, 4])  # 3: the mean of 3 equal fp32 values is not always exact
def test_u3_noloco_with_the_full_group_is_heavy_ball_diloco_with_zero_spread(n):
    history = _noloco_swarm([list(range(n))])
    phi, mom = _rand_list(0), None
    for thetas, noloco_phis in history:
        mean = weighted_mean([(pseudo_gradient(phi, th), 1.0) for th in thetas])
        phi, mom = heavy_ball_step(phi, mom, mean, lr=0.7, beta=0.5)
        assert replica_spread(noloco_phis) == 0.0
        assert all(_same(p, phi) for p in noloco_phis)  # bit for bit
    # negative control: pairs let the replicas drift apart
    paired = _noloco_swarm([[0, 1], [2, 3]])
    assert replica_spread(paired[-1][1]) > 1e-3


# ---------------------------------------------------------------- Streaming == DiLoCo, LocalSGD == DDP


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _batch(peer: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 * peer + step)
    x = torch.randn(8, 4, generator=g)
    return x, x.sum(1, keepdim=True).sin() + 0.1 * torch.randn(8, 1, generator=g)


def _inner_step(model, opt, peer, step):
    x, y = _batch(peer, step)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def _set_params(model, indices, values):
    params = list(model.parameters())
    with torch.no_grad():
        for i, v in zip(indices, values):
            params[i].copy_(v)


def _run_diloco(H: int, steps: int, peers: int = 2):
    base = _model()
    models = [copy.deepcopy(base) for _ in range(peers)]
    inner = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in models]
    outer = OuterOptimizer(list(base.parameters()))
    phi = outer.phi
    idx = list(range(len(phi)))
    for t in range(1, steps + 1):
        for i in range(peers):
            _inner_step(models[i], inner[i], i, t)
        if t % H == 0:
            mean = weighted_mean([(pseudo_gradient(phi, list(m.parameters())), 1.0) for m in models])
            phi = outer.step(mean)
            for m in models:
                _set_params(m, idx, phi)
    return [list(m.parameters()) for m in models], phi


def _run_streaming(H: int, P: int, tau: int, alpha: float, steps: int, peers: int = 2):
    validate_streaming(H, P, tau)
    base = _model()
    models = [copy.deepcopy(base) for _ in range(peers)]
    inner = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in models]
    named = list(base.named_parameters())
    frag = layer_fragments([k for k, _ in named], [v.numel() for _, v in named], P)
    outers = [OuterOptimizer([list(base.parameters())[i] for i in frag[f]]) for f in range(P)]
    phis = [o.phi for o in outers]
    in_flight: dict[int, list[list[torch.Tensor]]] = {}
    for t in range(1, steps + 1):
        for i in range(peers):
            _inner_step(models[i], inner[i], i, t)
        f = fragment_due(t, H, P)
        if f is not None:  # send Delta_f now, keep training for tau steps
            in_flight[f] = [pseudo_gradient(phis[f], [list(m.parameters())[k] for k in frag[f]]) for m in models]
        g = fragment_apply_due(t, H, P, tau)
        if g is not None:
            phis[g] = outers[g].step(weighted_mean([(d, 1.0) for d in in_flight.pop(g)]))
            for m in models:
                theta_g = [list(m.parameters())[k] for k in frag[g]]
                _set_params(m, frag[g], merge(theta_g, phis[g], alpha))
    return [list(m.parameters()) for m in models], [x for f in range(P) for x in phis[f]]


def test_u3_streaming_with_one_fragment_no_overlap_alpha_zero_is_diloco_bit_for_bit():
    H, steps = 4, 12  # 3 rounds
    d_params, d_phi = _run_diloco(H, steps)
    s_params, s_phi = _run_streaming(H, 1, 0, 0.0, steps)
    assert _same(d_phi, s_phi)
    for a, b in zip(d_params, s_params):
        assert _same(a, b)
        assert _same(a, d_phi)  # theta was reset to phi at the last step
    # negative controls: the comparison sees a merge weight, an overlap, and fragments
    assert not _same(_run_streaming(H, 1, 0, 0.5, steps)[0][0], d_params[0])
    assert not _same(_run_streaming(H, 1, 1, 0.0, steps)[0][0], d_params[0])
    assert not _same(_run_streaming(H, 2, 0, 0.0, steps)[0][0], d_params[0])


def test_u3_local_sgd_with_h1_and_plain_sgd_is_data_parallel_sgd():
    peers, lr, steps = 3, 0.1, 5

    def local_sgd(H):
        base = _model()
        outer = OuterOptimizer(list(base.parameters()), lr=1.0, momentum=0.0, nesterov=False)
        phi = outer.phi
        models = [copy.deepcopy(base) for _ in range(peers)]
        inner = [torch.optim.SGD(m.parameters(), lr=lr) for m in models]
        for t in range(1, steps * H + 1):
            for i in range(peers):
                _inner_step(models[i], inner[i], i, t)
            if t % H == 0:
                phi = outer.step(weighted_mean([(pseudo_gradient(phi, list(m.parameters())), 8) for m in models]))
                for m in models:
                    _set_params(m, range(len(phi)), phi)
        return phi

    def ddp(steps_):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for t in range(1, steps_ + 1):
            grads = []
            for i in range(peers):
                model.zero_grad()
                x, y = _batch(i, t)
                torch.nn.functional.mse_loss(model(x), y).backward()
                grads.append(([p.grad.clone() for p in model.parameters()], 8))
            for p, g in zip(model.parameters(), weighted_mean(grads)):
                p.grad = g
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    ref = ddp(steps)
    for a, b in zip(local_sgd(1), ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)  # equal up to fp32 rounding
    # negative control: H = 2 is not DDP with 2x the steps
    worst = max((a - b).abs().max().item() for a, b in zip(local_sgd(2), ddp(2 * steps)))
    assert worst > 1e-4


# ---------------------------------------------------------------- streaming schedule


def test_u4_fragment_schedule_h12_p4():
    due = [(t, fragment_due(t, 12, 4)) for t in range(1, 25)]
    assert [(t, f) for t, f in due if f is not None] == [
        (3, 0), (6, 1), (9, 2), (12, 3), (15, 0), (18, 1), (21, 2), (24, 3)]
    applied = [(t, fragment_apply_due(t, 12, 4, 2)) for t in range(1, 25)]
    assert [(t, f) for t, f in applied if f is not None] == [
        (5, 0), (8, 1), (11, 2), (14, 3), (17, 0), (20, 1), (23, 2)]
    assert [t for t in range(1, 13) if fragment_apply_due(t, 12, 4, 0) is not None] == [3, 6, 9, 12]


@pytest.mark.parametrize("H,P", [(1, 1), (12, 1), (12, 4), (12, 12), (52, 4), (100, 5)])
def test_u4_every_fragment_syncs_exactly_once_per_h_steps(H, P):
    for start in (1, H + 1, 5 * H + 1):
        seen = [fragment_due(t, H, P) for t in range(start, start + H)]
        assert sorted(f for f in seen if f is not None) == list(range(P))
        assert seen[-1] == P - 1  # the last fragment closes the round


def test_u4_layer_fragments_are_contiguous_balanced_and_cover_every_tensor():
    from swarm_node.train.model import GPTConfig, build_model

    # at the default width (at d_model 64 with as many layers as fragments, the embedding alone is
    # a third of a share and the best contiguous split is 20-26 % off)
    for n_layer, P in ((5, 5), (6, 3), (8, 5), (12, 5), (7, 2), (4, 4)):
        named = list(build_model(GPTConfig(n_layer=n_layer), 0).named_parameters())
        names, numels = [k for k, _ in named], [v.numel() for _, v in named]
        frags = layer_fragments(names, numels, P)
        assert [i for f in frags for i in f] == list(range(len(names)))  # contiguous, each tensor once
        shares = [sum(numels[i] for i in f) * P / sum(numels) for f in frags]
        assert all(0.8 <= s <= 1.2 for s in shares), (n_layer, P, shares)  # about 1/P each
        for f, g in zip(frags, frags[1:]):  # a weight and its bias always travel together
            assert names[f[-1]].rsplit(".", 1)[0] != names[g[0]].rsplit(".", 1)[0], (names[f[-1]], names[g[0]])
    # whole layers where they balance: 6 blocks in 3 fragments of 2 blocks each
    named = list(build_model(GPTConfig(n_layer=6), 0).named_parameters())
    frags = layer_fragments([k for k, _ in named], [v.numel() for _, v in named], 3)
    layers = [sorted({layer_of(named[i][0]) for i in f} - {None}) for f in frags]
    assert layers == [[0, 1], [2, 3], [4, 5]]
    for bad in ((["a"], [1, 2], 1), (["a", "b"], [1, 1], 3), (["a"], [1], 0)):
        with pytest.raises(ValueError):
            layer_fragments(*bad)


@pytest.mark.parametrize("H,P,tau,match", [
    (10, 4, 0, "multiple"),
    (12, 4, 3, "tau"),
    (12, 4, 7, "tau"),
    (12, 4, -1, "tau"),
    (12, 0, 0, "P"),
    (12, -4, 0, "P"),
    (0, 1, 0, "H"),
    (12.0, 4, 0, "H"),
    (12, 4, 0.5, "tau"),
    (4, 8, 0, "multiple"),
    (12, 12, 1, "tau"),
])
def test_u4_invalid_streaming_settings_raise(H, P, tau, match):
    with pytest.raises(ValueError, match=match):
        validate_streaming(H, P, tau)


def test_u4_valid_settings_pass_and_steps_count_from_one():
    validate_streaming(12, 4, 2)
    validate_streaming(1, 1, 0)
    with pytest.raises(ValueError):
        fragment_due(0, 12, 4)
    with pytest.raises(ValueError):
        fragment_due(3, 10, 4)
    assert fragment_apply_due(1, 12, 4, 2) is None


def test_merge_values_extremes_and_no_aliasing():
    theta, phi = [_t(1.0, -2.0, 5.0)], [_t(3.0, 2.0, -0.0)]
    assert merge(theta, phi, 0.5)[0].tolist() == [2.0, 0.0, 2.5]
    assert merge(theta, phi, 0.25)[0].tolist() == [2.5, 1.0, 1.25]
    # exact copies at the extremes, down to the sign of zero
    assert _same(merge(theta, phi, 0.0), phi) and _same(merge(theta, phi, 1.0), theta)
    out = merge(theta, phi, 0.0)
    out[0] += 1
    assert phi[0].tolist() == [3.0, 2.0, 0.0] and theta[0].tolist() == [1.0, -2.0, 5.0]
    assert merge([torch.tensor([1.0], dtype=torch.bfloat16)], [_t(0.0)], 0.5)[0].dtype == torch.float32
    for alpha in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            merge(theta, phi, alpha)


# ---------------------------------------------------------------- pairing


PEERS = [f"Qm{c}" for c in "abcdefgh"]


def test_pairing_is_deterministic_and_ignores_input_order():
    seed = pairing_seed("run-1", 7)
    assert seed == pairing_seed("run-1", 7)
    assert pair_peers(PEERS, seed) == pair_peers(PEERS, seed) == pair_peers(list(reversed(PEERS)), seed)


@pytest.mark.parametrize("n", range(0, 10))
def test_pairing_is_a_perfect_matching(n):
    ids = PEERS[:n] + [f"Qz{i}" for i in range(max(0, n - len(PEERS)))]
    for r in range(5):
        p = pair_peers(ids, pairing_seed("run", r))
        assert sorted(p) == sorted(ids)  # every peer appears once
        assert sum(v is None for v in p.values()) == n % 2  # odd one out
        for a, b in p.items():
            assert a != b
            if b is not None:
                assert p[b] == a


def test_pairing_changes_with_round_and_run_and_is_unbiased():
    seeds = [pairing_seed("run", r) for r in range(20)]
    assert len(set(seeds)) == 20 and pairing_seed("other", 0) != seeds[0]
    pairings = [tuple(sorted(pair_peers(PEERS, s).items(), key=lambda kv: kv[0])) for s in seeds]
    assert pairings[0] != pairings[1]
    assert len(set(pairings)) >= 15  # 105 matchings of 8 peers
    # 4 peers have 3 matchings; each should come up about 1/3 of the time
    counts: dict[frozenset, int] = {}
    for r in range(300):
        p = pair_peers(PEERS[:4], pairing_seed("u", r))
        key = frozenset(frozenset((a, b)) for a, b in p.items())
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 3 and all(70 <= c <= 130 for c in counts.values()), counts
    # the odd one out rotates too
    loners = {next(a for a, b in pair_peers(PEERS[:5], pairing_seed("o", r)).items() if b is None)
              for r in range(40)}
    assert loners == set(PEERS[:5])


def test_pairing_rejects_duplicates():
    with pytest.raises(ValueError):
        pair_peers(["a", "b", "a"], 1)
    assert pair_peers(["solo"], 3) == {"solo": None}


# ---------------------------------------------------------------- digests and spread


def test_round_digest_is_over_dtype_shape_and_bits_in_order():
    a = _rand_list(1)
    d = round_digest(a)
    assert len(d) == 16 and int(d, 16) >= 0 and len(round_digest(a, 64)) == 64
    assert round_digest([x.clone() for x in a]) == d
    assert round_digest(list(reversed(a))) != d
    flipped = [x.clone() for x in a]
    flipped[0].view(-1).view(torch.int32)[5] ^= 1  # one bit
    assert round_digest(flipped) != d
    assert round_digest([a[0].reshape(-1)] + a[1:]) != d
    assert round_digest([a[0].double()] + a[1:]) != d
    assert round_digest([_t(0.0)]) != round_digest([_t(-0.0)])


def test_replica_spread():
    a = _rand_list(1)
    assert replica_spread([a, [x.clone() for x in a], a]) == 0.0
    b = [x + 1.0 for x in a]
    assert replica_spread([a, b]) == pytest.approx(0.5, abs=1e-6)  # std of {x, x+1}
    with pytest.raises(ValueError):
        replica_spread([])


def test_u4_layer_fragments_of_hugging_face_models():
    """GPT-2 (transformer.h.N) and Llama (model.layers.N) name their blocks differently; both are
    cut between whole layers when they balance."""
    transformers = pytest.importorskip("transformers")
    models = {
        "gpt2": transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=6, n_embd=128, n_head=4, vocab_size=300,
                                                                     n_positions=64)),
        "llama": transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=64)),
    }
    for name, model in models.items():
        named = list(model.named_parameters())
        names, numels = [k for k, _ in named], [v.numel() for _, v in named]
        for P in (2, 3, 5):
            frags = layer_fragments(names, numels, P)
            assert [i for f in frags for i in f] == list(range(len(names)))
            shares = [sum(numels[i] for i in f) * P / sum(numels) for f in frags]
            assert all(0.8 <= s <= 1.2 for s in shares), (name, P, shares)


def test_outer_momentum_zero_is_plain_sgd_and_lr_one_is_plain_averaging():
    """--outer-momentum 0 (with the default Nesterov) used to crash the node at start; it is
    plain SGD on the pseudo-gradient, and with lr 1 the new φ is φ minus the mean delta."""
    from swarm_node.strategies.lowcomm.outer_math import OuterOptimizer

    phi = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    opt = OuterOptimizer(phi, lr=1.0, momentum=0.0)
    delta = [torch.tensor([0.5, -1.0]), torch.tensor([[1.0]])]
    for _ in range(2):  # no momentum: each step moves by exactly the delta given
        phi = [p - d for p, d in zip(phi, delta)]
        got = opt.step(delta)
        assert all(torch.equal(g, w) for g, w in zip(got, phi))
