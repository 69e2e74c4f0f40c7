"""SAPO pure parts: tasks, signed rollout records (every rejection reason), the I+J builder,
GRPO math goldens, guards, the run spec, and the byte policy (no network)."""
from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path

import msgpack
import pytest
import torch

from swarm_node.config import NodeConfig
from swarm_node.identity import ensure_identity
from swarm_node.protocol.signing import Context, Signer
from swarm_node.train.model import GPTConfig, build_model
from swarm_node.strategies.sapo import tasks as tasks
from swarm_node.strategies.sapo.math import (ScoredGroup, all_zero, build_training_set, finite_grads,
                                             group_advantages, grpo_loss, scale_external_negatives,
                                             training_advantages)
from swarm_node.strategies.sapo.policy import BytePolicy
from swarm_node.strategies.sapo.records import (MAX_ROLLOUT_BYTES, VERSION, Manifest, RolloutGroup, RolloutRejected,
                                                decode_gossip_addrs, decode_rollout, encode_gossip_addrs,
                                                encode_rollout, manifest_key, round_of)


# ---- tasks ----------------------------------------------------------------------------
def test_tasks_are_deterministic_and_verified():
    a, b = tasks.make_item("add4", 3, 17), tasks.make_item("add4", 3, 17)
    assert a == b and a.question.endswith("=") and int(a.truth) == eval(a.question[:-1])
    assert tasks.make_item("mul5", 0, 1).truth == str(eval(tasks.make_item("mul5", 0, 1).question[:-1]))
    assert {tasks.make_item("add4", 0, i).question for i in range(400)} <= {f"{x}+{y}=" for x in range(5) for y in range(5)}
    assert tasks.score(a, a.truth) == 1.0 and tasks.score(a, f" {a.truth} ") == 1.0
    assert tasks.score(a, "99") == 0.0 and tasks.score(a, "99", format_reward=0.1) == 0.1
    assert tasks.score(a, "x7") == 0.0 and tasks.score(a, "") == 0.0
    with pytest.raises(tasks.TaskError, match="unknown task"):
        tasks.parse_task_list("add4,div3")
    with pytest.raises(tasks.TaskError):
        tasks.make_item("add4", -1, 0)


@pytest.mark.skipif(not tasks.reasoning_gym_available(), reason="reasoning-gym not installed (extra 'rl')")
def test_reasoning_gym_items_regenerate_and_score():
    for name in ("rg:chain_sum", "rg:basic_arithmetic", "rg:base_conversion"):
        for i in range(10):
            item = tasks.make_item(name, 42, i)
            assert item == tasks.make_item(name, 42, i)
            assert tasks.score(item, item.truth) == 1.0 and tasks.score(item, "zzz") < 1


# ---- records --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def signers(tmp_path_factory) -> tuple[Signer, Signer]:
    d = tmp_path_factory.mktemp("keys")
    return tuple(Signer.from_identity_file(ensure_identity(d / f"k{i}").path) for i in range(2))  # type: ignore


def _group(s: Signer, rnd: int = 10, completions=("1", "2", "3", "4"), **kw) -> RolloutGroup:
    item = tasks.make_item("add4", 0, 5)
    return RolloutGroup(kw.pop("run_id", "run"), rnd, kw.pop("sender", s.peer_id), item.task, item.seed, item.index,
                        item.question, tuple(completions), kw.pop("meta", {"model": "byte-gpt-1x64"}))


def _decode(blob, **kw):
    args = dict(run_id="run", group_size=4, current_round=10, from_peer=None)
    args.update(kw)
    return decode_rollout(blob, **args)


def test_signer_peer_id_matches_the_node_identity(tmp_path: Path):
    ident = ensure_identity(tmp_path / "identity.key")
    assert Signer.from_identity_file(ident.path).peer_id == ident.peer_id


def test_rollout_round_trip(signers):
    s, _ = signers
    sr = encode_rollout(_group(s), s)
    got = _decode(sr.wire, from_peer=s.peer_id)
    assert got.group == sr.group and got.group_id == sr.group_id and len(sr.group_id) == 32
    assert b"reward" not in sr.wire and b"truth" not in sr.wire  # never shared


def _reject(blob, reason, **kw):
    with pytest.raises(RolloutRejected) as e:
        _decode(blob, **kw)
    assert e.value.reason == reason, e.value


def test_every_rejection_reason(signers):
    s, other = signers
    good = encode_rollout(_group(s), s)
    # bad_types: not msgpack, wrong shape, bool for int, non-string completion, other run, unknown task
    _reject(b"\xc1garbage", "bad_types")
    _reject(msgpack.packb([VERSION, b"x"]), "bad_types")
    body = msgpack.unpackb(msgpack.unpackb(good.wire)[1])
    for i, bad in ((1, True), (7, [1, 2, 3, 4])):
        f = list(body)
        f[i] = bad
        _reject(msgpack.packb([VERSION, msgpack.packb(f), s.public_key.proto,
                               s.sign(Context.SAPO_ROLLOUT, msgpack.packb(f))]), "bad_types")
    _reject(encode_rollout(_group(s, run_id="other"), s).wire, "bad_types")
    _reject(good.wire, "bad_types", known_task=lambda t: False)
    # wrong_group_size
    _reject(encode_rollout(_group(s, completions=("1", "2", "3")), s).wire, "wrong_group_size")
    # oversize: the blob, and one completion
    _reject(b"\x00" * (MAX_ROLLOUT_BYTES + 1), "oversize")
    _reject(encode_rollout(_group(s, completions=("1", "2", "3", "9" * 2000)), s).wire, "oversize")
    # stale_round: too old and too far ahead
    _reject(encode_rollout(_group(s, rnd=8), s).wire, "stale_round")
    _reject(encode_rollout(_group(s, rnd=12), s).wire, "stale_round")
    # forged_signature: tampered body, someone else's key, claimed sender != origin
    outer = msgpack.unpackb(good.wire)
    f = list(body)
    f[7] = ["4", "4", "4", "4"]
    _reject(msgpack.packb([VERSION, msgpack.packb(f), outer[2], outer[3]]), "forged_signature")
    spoof = msgpack.packb(list(body))  # body claims s, signed and keyed by `other`
    _reject(msgpack.packb([VERSION, spoof, other.public_key.proto, other.sign(Context.SAPO_ROLLOUT, spoof)]),
            "forged_signature")
    _reject(good.wire, "forged_signature", from_peer=other.peer_id)
    with pytest.raises(ValueError, match="only its own"):
        encode_rollout(_group(s, sender=other.peer_id), s)


def test_manifest_and_gossip_address_records(signers):
    s, other = signers
    m = Manifest(s.peer_id, 7, ("ab" * 16, "cd" * 16))
    assert Manifest.from_wire(m.to_wire(), subkey=s.peer_id, round_=7) == m
    with pytest.raises(ValueError):
        Manifest.from_wire(m.to_wire(), subkey=other.peer_id, round_=7)  # stored under another's subkey
    with pytest.raises(ValueError):
        Manifest.from_wire(m.to_wire(), subkey=s.peer_id, round_=8)
    addr = f"/ip4/127.0.0.1/tcp/1234/p2p/{s.peer_id}"
    assert decode_gossip_addrs(encode_gossip_addrs(s.peer_id, [addr]), subkey=s.peer_id) == [addr]
    with pytest.raises(ValueError):
        decode_gossip_addrs(encode_gossip_addrs(s.peer_id, [f"/ip4/1.2.3.4/tcp/1/p2p/{other.peer_id}"]),
                            subkey=s.peer_id)
    assert manifest_key("run", 9) == "swarm/run/sapo/round/9"
    assert round_of(39.99, 4.0) == 9 and round_of(40.0, 4.0) == 10


# ---- builder --------------------------------------------------------------------------
def _sg(sender: str, i: int, rewards, external=True) -> ScoredGroup:
    return ScoredGroup(sender, f"{sender}-{i}", ("add4", 0, i), "1+1=", tuple("2" for _ in rewards), tuple(rewards),
                       external)


def test_builder_exact_i_plus_j_never_own_drops_zero_variance():
    me = "me"
    local = [_sg(me, i, (0, 1, 0, 0), external=False) for i in range(4)]
    external = ([_sg("p1", i, (1, 0, 1, 0)) for i in range(5)] + [_sg("p2", i, (0, 0, 0, 0)) for i in range(3)]
                + [_sg("p2", 9, (0.01, 0.01, 0.01, 0.01))] + [_sg(me, 20 + i, (1, 0, 0, 0)) for i in range(3)]
                + [_sg("p1", 0, (1, 0, 0, 0))])  # a duplicate of p1's first group
    ts = build_training_set(local, external, my_peer_id=me, num_local=4, num_external=4, rng=random.Random(0))
    assert len(ts.groups) == 8 and ts.local_used == 4 and ts.external_used == 4 and ts.shortfall == 0
    ext = [g for g in ts.groups if g.external]
    assert all(g.sender == "p1" for g in ext) and all(not g.zero_variance for g in ext)
    assert ts.dropped_own == 3 and ts.dropped_zero_variance == 4 and ts.dropped_duplicate == 1
    short = build_training_set(local, external, my_peer_id=me, num_local=4, num_external=8, rng=random.Random(0))
    assert short.external_used == 5 and short.shortfall == 3  # counted, not fatal
    silo = build_training_set(local, external, my_peer_id=me, num_local=4, num_external=0, rng=random.Random(0))
    assert len(silo.groups) == 4 and silo.shortfall == 0


def test_builder_samples_uniformly():
    external = [_sg("p", i, (1, 0)) for i in range(10)]
    counts: Counter = Counter()
    rng = random.Random(123)
    draws = 4000
    for _ in range(draws):
        ts = build_training_set([], external, my_peer_id="me", num_local=0, num_external=2, rng=rng)
        counts.update(g.group_id for g in ts.groups)
    expected = draws * 2 / 10
    chi2 = sum((counts[g.group_id] - expected) ** 2 / expected for g in external)
    assert chi2 < 27.9  # chi-square, 9 degrees of freedom, p = 0.001


# ---- GRPO math ------------------------------------------------------------------------
def test_group_advantages_goldens():
    adv = group_advantages(torch.tensor([[1.0, 0, 0, 1], [1, 0, 0, 0], [0.3, 0.3, 0.3, 0.3]]))
    assert torch.allclose(adv[0], torch.tensor([1.0, -1, -1, 1]), atol=1e-6)
    s = 1 / math.sqrt(3)
    assert torch.allclose(adv[1], torch.tensor([3 * s, -s, -s, -s]), atol=1e-6)
    assert torch.equal(adv[2], torch.zeros(4))  # an all-equal group gives exactly 0
    assert torch.allclose(adv.sum(dim=1), torch.zeros(3), atol=1e-6)
    raw = group_advantages(torch.tensor([[1.0, 0, 0, 0]]), normalize_std=False)
    assert torch.allclose(raw, torch.tensor([[0.75, -0.25, -0.25, -0.25]]))


def test_external_negative_scale_touches_only_external_negatives():
    adv = torch.tensor([[1.0, -1.0], [1.0, -1.0]])
    ext = torch.tensor([False, True])
    assert torch.equal(scale_external_negatives(adv, ext, 0.0), torch.tensor([[1.0, -1.0], [1.0, 0.0]]))
    assert torch.equal(scale_external_negatives(adv, ext, 0.25), torch.tensor([[1.0, -1.0], [1.0, -0.25]]))
    assert torch.equal(scale_external_negatives(adv, ext, 1.0), adv)


def test_grpo_loss_goldens():
    old = torch.zeros(2, 2)
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    # ratio 1: loss = -mean over valid tokens of A = (-2 - 2 + 1) / 3
    assert float(grpo_loss(old, old, torch.tensor([2.0, -1.0]), mask)) == pytest.approx(-1.0)
    # ratio 1.5 with A = +1 is clipped at 1 + 0.28; ratio 0.5 with A = -1 is clipped at 1 - 0.2
    up = torch.full((1, 1), math.log(1.5))
    assert float(grpo_loss(up, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1))) == pytest.approx(-1.28)
    down = torch.full((1, 1), math.log(0.5))
    assert float(grpo_loss(down, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1))) == pytest.approx(0.8)
    # the per-token loss is clamped to +-10
    assert float(grpo_loss(old[:1, :1], old[:1, :1], torch.tensor([50.0]), torch.ones(1, 1))) == pytest.approx(-10)


def test_guards():
    assert all_zero(torch.zeros(2, 4)) and not all_zero(torch.tensor([[0.0, 1e-9]]))
    assert finite_grads([torch.ones(3), None]) and not finite_grads([torch.tensor([1.0, float("nan")])])
    ts = build_training_set([_sg("me", 0, (1, 1), external=False)], [], my_peer_id="me", num_local=1,
                            num_external=0, rng=random.Random(0))
    assert all_zero(training_advantages(ts, negative_scale=0.0))  # such a step is skipped


# ---- run spec -------------------------------------------------------------------------
def test_sapo_run_spec_ignores_model_size_but_not_the_exchange_fields():
    small = NodeConfig(strategy="sapo", n_layer=1, d_model=64, n_head=4).run_spec()
    big = NodeConfig(strategy="sapo", n_layer=4, d_model=256, n_head=8).run_spec()
    assert small.digest() == big.digest() and small.n_layer == 0
    assert NodeConfig(strategy="sapo", sapo_group_size=4).run_spec().digest() != small.digest()
    assert NodeConfig(strategy="sapo", sapo_round_s=5).run_spec().digest() != small.digest()
    assert NodeConfig(strategy="sapo", sapo_local_groups=2, sapo_external_groups=6).run_spec().digest() == small.digest()
    s1, s2 = NodeConfig(n_layer=1).run_spec(), NodeConfig(n_layer=2).run_spec()
    assert s1.digest() != s2.digest() and s1.n_layer == 1  # other strategies: unchanged
    assert "sapo_group_size" not in s1.canonical()


# ---- byte policy ----------------------------------------------------------------------
def test_byte_policy_generates_groups_and_scores_foreign_text():
    model = build_model(GPTConfig(seq_len=16, n_layer=1, n_head=2, d_model=16), seed=0)
    pol = BytePolicy(model, torch.device("cpu"), max_new_tokens=4)
    out = pol.generate(["1+2=", "10+3="], 3, temperature=1.0, generator=torch.Generator().manual_seed(0))
    again = pol.generate(["1+2=", "10+3="], 3, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert out == again and [len(g) for g in out] == [3, 3] and all(len(c.encode('latin-1')) <= 4 for g in out for c in g)
    logp, mask = pol.token_logprobs(["1+2=", "10+3="], ["3", "13"])
    assert logp.shape == mask.shape and mask.sum(dim=1).tolist() == [2, 3]  # completion bytes + EOS
    assert bool((logp[mask] < 0).all())
    with pytest.raises(ValueError, match="seq-len"):
        pol.check_prompt("1" * 14)


def test_external_groups_are_scored_by_my_verifier_only(signers):
    from swarm_node.strategies.sapo.strategy import score_external

    s, _ = signers
    item = tasks.make_item("add4", 0, 5)
    comps = (item.truth, "99", "x", item.truth)
    # whatever the sender claims in its metadata, rewards come from the regenerated truth
    g = RolloutGroup("run", 10, s.peer_id, item.task, item.seed, item.index, item.question, comps,
                     {"reward": 1.0, "truth": "99"})
    scored = score_external(encode_rollout(g, s), format_reward=0.1)
    assert scored is not None and scored.rewards == (1.0, 0.1, 0.0, 1.0) and scored.external
    lie = RolloutGroup("run", 10, s.peer_id, item.task, item.seed, item.index, "1+1=" if item.question != "1+1=" else
                       "2+2=", comps, {})
    assert score_external(encode_rollout(lie, s)) is None  # question does not match its (task, seed, index)


def test_the_node_side_never_imports_py_libp2p():
    import subprocess
    import sys

    code = ("import sys, swarm_node.strategies.sapo.strategy, swarm_node.sidecars.gossip, swarm_node.daemon; "
            "assert 'libp2p' not in sys.modules, 'py-libp2p loaded in the node process'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_sapo_config_errors_are_plain():
    from swarm_node.config import ConfigError, load_config

    for bad, words in (({"sapo_local_groups": 9}, "<= --sapo-questions"), ({"sapo_tasks": "div3"}, "unknown task"),
                       ({"seq_len": 8}, "--seq-len >="), ({"sapo_hf_model": "/nonexistent"}, "sapo-hf-model")):
        with pytest.raises(ConfigError, match=words):
            load_config({"strategy": "sapo", **bad})
    load_config({"strategy": "sapo", "sapo_tasks": "add4,mul9"})  # fine


def test_local_groups_are_the_informative_ones_padded_to_exactly_i():
    """With Q = 8 own groups and I = 4, the builder trains on own groups that can teach
    something (non-zero variance) before zero-variance ones, and always on exactly I; I = Q
    keeps all of them in order, and 'first' is the plain first I."""
    me = "me"
    local = [_sg(me, i, (0, 0, 0, 0) if i % 3 else (1, 0, 1, 0), external=False) for i in range(8)]  # 0, 3, 6 informative
    ts = build_training_set(local, [], my_peer_id=me, num_local=4, num_external=0, rng=random.Random(1))
    ids = [g.group_id for g in ts.groups]
    assert len(ids) == 4 == ts.local_used and set(ids[:3]) == {"me-0", "me-3", "me-6"} and ids[3] == "me-1"
    many = [_sg(me, i, (1, 0), external=False) for i in range(8)]
    picks = Counter(g.group_id for seed in range(400) for g in
                    build_training_set(many, [], my_peer_id=me, num_local=2, num_external=0,
                                       rng=random.Random(seed)).groups)
    assert len(picks) == 8 and min(picks.values()) > 60  # uniform among informative groups (mean 100)
    every = build_training_set(local, [], my_peer_id=me, num_local=8, num_external=0, rng=random.Random(0))
    assert [g.group_id for g in every.groups] == [g.group_id for g in local]
    first = build_training_set(local, [], my_peer_id=me, num_local=4, num_external=0, rng=random.Random(0),
                               local_select="first")
    assert [g.group_id for g in first.groups] == ["me-0", "me-1", "me-2", "me-3"]
    with pytest.raises(ValueError, match="local groups given"):
        build_training_set(local[:2], [], my_peer_id=me, num_local=4, num_external=0, rng=random.Random(0))


# ---- when a run ends ------------------------------------------------------------------
def test_round_budget_counts_every_round_as_the_steps_it_would_train():
    from swarm_node.strategies.sapo.strategy import round_budget
    assert round_budget(0, 20, 4) is None  # no --max-steps: run until stopped
    assert round_budget(44, 20, 4) == 6
    assert round_budget(45, 20, 4) == 7  # a partial round still runs
    assert round_budget(44, 44, 4) == 0  # resumed at the budget: nothing left


def test_a_policy_that_never_trains_still_ends_at_its_max_steps_rounds():
    """Every round's groups have one reward (nothing to learn): the policy's step never moves,
    and the run must still end, after the rounds --max-steps pays for, with a reason."""
    import asyncio
    from types import SimpleNamespace
    from swarm_node.strategies.sapo.strategy import SapoStrategy

    s = object.__new__(SapoStrategy)
    rounds: list[int] = []

    async def skipped_round(rnd: int) -> str:
        rounds.append(rnd)
        return "skipped_all_zero"

    async def ready() -> bool:
        return True

    s.ctx = SimpleNamespace(options=SimpleNamespace(sapo_warmstart_steps=0, sapo_rounds=0, sapo_ppo_epochs=4),
                            node=SimpleNamespace(max_steps=44), should_stop=lambda: False,
                            progress=SimpleNamespace(state="joining"), log=SimpleNamespace(info=lambda *a: None))
    s.round_s, s.rounds_done, s.gossip = 0.02, 0, None
    s.wait_for_peers, s._round, s._policy_steps = ready, skipped_round, lambda: 20
    reason = asyncio.run(asyncio.wait_for(s.run(), 10.0))
    assert len(rounds) == 6 and s.rounds_done == 6
    assert "--max-steps 44" in reason and "6 of them trained nothing" in reason
