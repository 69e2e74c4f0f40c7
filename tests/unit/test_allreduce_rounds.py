"""Pure parts of the averaging layer: shard bounds, shard reduction, the commit decision."""
from __future__ import annotations

import asyncio

import pytest
import torch

from swarm_node.protocol.averaging.butterfly import _Reduction, shard_bounds
from swarm_node.strategies.lowcomm.diloco import flatten, unflatten
from swarm_node.protocol.averaging.transaction import _LeaderRound, group_digest


@pytest.mark.parametrize("numel,parts", [(10, 3), (3, 5), (0, 2), (1000, 1), (7, 7)])
def test_shard_bounds_cover_exactly_once(numel, parts):
    b = shard_bounds(numel, parts)
    assert len(b) == parts and b[0][0] == 0 and b[-1][1] == numel
    assert all(prev[1] == cur[0] for prev, cur in zip(b, b[1:]))
    sizes = [e - s for s, e in b]
    assert max(sizes) - min(sizes) <= 1


def test_reduction_weighted_mean_zero_weight_joiner_and_duplicates():
    async def go():
        red = _Reduction(expected={"a", "b", "j"}, length=3, total=torch.zeros(3))
        red.add("a", torch.tensor([1.0, 2.0, 3.0]), 1.0)
        red.add("a", torch.tensor([100.0, 100.0, 100.0]), 1.0)  # a duplicate push is ignored
        red.add("j", torch.tensor([50.0, 50.0, 50.0]), 0.0)  # joiner: weight 0 changes nothing
        assert not red.closed.is_set()
        red.add("b", torch.tensor([3.0, 2.0, 1.0]), 3.0)
        assert red.closed.is_set()
        torch.testing.assert_close(red.result, torch.tensor([2.5, 2.0, 1.5]))
        only_joiners = _Reduction(expected={"j"}, length=2, total=torch.zeros(2))
        only_joiners.add("j", torch.ones(2), 0.0)
        torch.testing.assert_close(only_joiners.result, torch.zeros(2))  # zero update, not NaN

    asyncio.run(go())


@pytest.mark.parametrize("w_local", [1.0, 0.5, 0.0])
def test_reduction_own_part_is_written_with_the_first_other_part_or_at_close(w_local):
    async def go():
        mine, other = torch.arange(10.0), torch.full((10,), 4.0)
        red = _Reduction(expected={"me", "b"}, length=10, total=torch.full((10,), float("nan")), segment=4)
        red.add_local("me", mine, w_local)
        assert red.contributors == {"me"} and not red.closed.is_set()
        red.add("b", other, 2.0)
        assert red.closed.is_set() and red.weight == w_local + 2.0
        torch.testing.assert_close(red.result, (w_local * mine + 2.0 * other) / (w_local + 2.0))
        # alone after a timeout: the mean of whoever is in, i.e. my own part (or zero at weight 0)
        late = _Reduction(expected={"me", "b"}, length=10, total=torch.full((10,), float("nan")), segment=4)
        late.add_local("me", mine, w_local)
        late.close()
        torch.testing.assert_close(late.result, mine if w_local > 0 else torch.zeros(10))
        assert late.contributors == {"me"}
        alone = _Reduction(expected={"me"}, length=10, total=torch.empty(10), segment=4)
        alone.add_local("me", mine, w_local)
        assert alone.closed.is_set()

    asyncio.run(go())


def test_commit_needs_every_member_complete_and_agreeing():
    async def go():
        def round_with(votes):
            r = _LeaderRound(0, "h", expected={"a", "b"})
            r.joined = {"a": 1.0, "b": 1.0}
            r.freeze("run")
            for peer, (complete, digest) in votes.items():
                r.vote(peer, complete, digest)
            return r

        assert round_with({"a": (True, "x"), "b": (True, "x")}).decide() is True
        assert round_with({"a": (True, "x"), "b": (False, "x")}).decide() is False
        assert round_with({"a": (True, "x"), "b": (True, "y")}).decide() is False
        assert round_with({"a": (True, "x")}).decide() is False  # b never voted
        r = round_with({"a": (True, "x"), "outsider": (True, "x"), "b": (True, "x")})
        assert "outsider" not in r.votes and r.decide() is True
        assert r.group_id == group_digest("run", 0, ["a", "b"])

    asyncio.run(go())


def test_flatten_unflatten_round_trip():
    ts = [torch.randn(2, 3), torch.randn(4), torch.randn(1, 1, 2)]
    back = unflatten(flatten(ts), ts)
    for a, b in zip(ts, back):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_noloco_with_gamma_equal_lr_needs_only_the_partners_theta():
    """The strategy passes its own φ in place of the partner's (unknown) φ: with γ = η that
    must equal the collapsed update δ ← βδ + η(mean θ − φ_i) the NoLoCo code uses."""
    from swarm_node.strategies.lowcomm.outer_math import noloco_update

    g = torch.Generator().manual_seed(0)
    phi = [torch.randn(5, generator=g)]
    mom = [torch.randn(5, generator=g)]
    t1, t2 = [torch.randn(5, generator=g)], [torch.randn(5, generator=g)]
    lr, beta = 0.7, 0.5
    new_phi, new_mom = noloco_update(phi, mom, [phi, phi], [t1, t2], lr=lr, gamma=lr, beta=beta)
    expected_mom = beta * mom[0] + lr * ((t1[0] + t2[0]) / 2 - phi[0])
    torch.testing.assert_close(new_mom[0], expected_mom, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(new_phi[0], phi[0] + expected_mom, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["fp16", "int8", "e3m0"])
def test_lossy_shard_is_used_exactly_as_the_others_decode_it(name):
    """A reducer must keep the compressed-then-decoded mean of its own shard (what the other
    members receive), or members hold different vectors and a lossy round never commits."""
    from swarm_node.protocol import codec
    from swarm_node.protocol.averaging.butterfly import ButterflyAllReduce
    from swarm_node.strategies.lowcomm.diloco import COMPRESSIONS

    ar = ButterflyAllReduce(transport=None, timeout_s=1, compression=COMPRESSIONS[name])
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    mine = ar._as_sent(x)
    chunks = list(codec.tensors_to_chunks([x], COMPRESSIONS[name]))
    asm = codec.ChunkAssembler(1, max_numel_total=1000)
    for c in chunks:
        asm.add(c)
    theirs = asm.result()[0]
    torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    assert not torch.equal(mine, x)  # it really is lossy, so the test can tell the difference


def test_an_aborted_round_is_retried_as_a_fresh_epoch():
    """A retry must get a new epoch, group id and vote: reusing the aborted round (its group id,
    its cached 'abort') would make a round that failed once fail forever."""
    from swarm_node.protocol.averaging.transaction import RoundCoordinator

    async def go():
        class T:  # the minimum of Transport the leader-side bookkeeping touches
            peer_id = "a"

        rc = RoundCoordinator(T(), "run", timeout_s=1, grace_s=1, allreduce=None, leader_fn=lambda: "a",
                              expected_fn=lambda: {"b"}, state_fn=lambda: (5, "h"))
        first = rc._round(5, "h")
        first.joined = {"a": 1.0, "b": 1.0}
        first.freeze("run")
        first.vote("a", True, "x")
        first.vote("b", False, "")
        assert first.decide() is False
        retry = rc._round(5, "h")
        assert retry is not first and retry.epoch == 1 and retry.decision is None
        retry.joined = {"a": 1.0, "b": 1.0}
        retry.freeze("run")
        assert retry.group_id != first.group_id
        retry.vote("a", True, "x")
        retry.vote("b", True, "x")
        assert retry.decide() is True
        assert rc._round(5, "h") is retry  # a committed round is not reopened

    asyncio.run(go())


def test_members_left_out_of_a_frozen_group_are_counted_as_stragglers():
    """The deadline quorum: the leader freezes without expected members that missed the grace
    window, and counts them; a round everyone joined counts nothing."""
    from swarm_node.protocol.averaging.transaction import RoundCoordinator

    counted: list[int] = []

    class T:
        peer_id = "a"

    rc = RoundCoordinator(T(), "run", timeout_s=1, grace_s=1, allreduce=None, leader_fn=lambda: "a",
                          expected_fn=lambda: {"b", "c", "d"}, state_fn=lambda: (5, "h"), on_stragglers=counted.append)
    full = rc._round(5, "h")
    full.joined = {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}
    full.freeze("run")
    late = rc._round(6, "h")
    late.joined = {"a": 1.0, "c": 1.0}
    late.freeze("run")
    late.freeze("run")  # freezing twice (grace timer and last join) counts once
    assert counted == [2] and late.group == ["a", "c"]


def test_a_round_rpc_whose_stream_closed_without_a_reply_is_sent_once_more():
    """Join and vote are idempotent at the leader, so a stream that ended before its reply (seen on
    live p2p streams while both sides are fine) is retried once; a second silent close, or a
    missed deadline, is still an error."""
    from swarm_node.protocol.transport import ClosedWithoutAnswer, PeerUnavailable
    from swarm_node.protocol.averaging.transaction import RoundCoordinator

    class T:
        peer_id = "a"

        def __init__(self, script):
            self.script, self.calls = list(script), 0

        async def call(self, peer, method, msgs, reply_type, timeout_s, channel):
            self.calls += 1
            what = self.script.pop(0)
            if isinstance(what, Exception):
                raise what
            for reply in what:
                yield reply

    async def call(script):
        t = T(script)
        rc = RoundCoordinator(t, "run", timeout_s=1, grace_s=1, allreduce=None, leader_fn=lambda: "b",
                              expected_fn=lambda: {"b"}, state_fn=lambda: (0, "h"))
        try:
            return await rc._call_one("b", "round.join", object(), object, 5.0), t.calls
        except PeerUnavailable as e:
            return e, t.calls

    assert asyncio.run(call([[], ["ok"]])) == ("ok", 2)  # closed once, answered on the retry
    err, calls = asyncio.run(call([[], ClosedWithoutAnswer("closed again")]))
    assert isinstance(err, ClosedWithoutAnswer) and calls == 2
    err, calls = asyncio.run(call([PeerUnavailable("missed the deadline"), ["late"]]))
    assert isinstance(err, PeerUnavailable) and calls == 1  # a deadline is not retried


def test_a_leader_behind_a_member_with_more_merged_work_adopts_instead_of_resyncing_it():
    """After a split the lowest id (the leader) may hold the stale side. A member whose state
    differs is sent to resync only if its state holds no more merged work than the leader's;
    otherwise the leader is told to adopt (on_behind), its own pending round is frozen so it
    does not wait out the grace window, and the member hears LEADER_BEHIND (retry)."""
    from swarm_node.protocol.pb import swarm_node_rounds_pb2 as rpb
    from swarm_node.protocol.averaging.transaction import JoinStatus, RoundCoordinator

    class T:
        peer_id = "a"

    async def admit(leader_work: int, member_work: int, member_round: int = 3):
        behind: list[str] = []
        rc = RoundCoordinator(T(), "run", timeout_s=0.2, grace_s=30, allreduce=None, leader_fn=lambda: "a",
                              expected_fn=lambda: {"b"}, state_fn=lambda: (3, "old"), work_fn=lambda: leader_work,
                              on_behind=behind.append)
        mine = rc._round(3, "old")
        mine.joined = {"a": 1.0}
        join = rpb.RoundJoin(run_id="run", round=member_round, phi_hash="new", weight=1.0, num_elements=4,
                             work=member_work)
        reply = await rc._admit(join, "b")
        return reply, behind, mine.frozen.is_set()

    reply, behind, frozen = asyncio.run(admit(leader_work=10, member_work=30, member_round=7))
    assert reply.status == JoinStatus.ROUND_STATUS_LEADER_BEHIND and behind == ["b"] and frozen
    reply, behind, frozen = asyncio.run(admit(leader_work=30, member_work=10))
    assert reply.status == JoinStatus.ROUND_STATUS_RESYNC and behind == [] and not frozen
    reply, behind, _ = asyncio.run(admit(leader_work=10, member_work=10))  # a tie: the leader's state wins
    assert reply.status == JoinStatus.ROUND_STATUS_RESYNC and behind == []


def test_the_leader_answers_a_join_before_the_members_deadline_runs_out():
    """The member gives a join grace + timeout. A leader that waited for its own catch-up
    (up to timeout) and then for the freeze (grace + timeout) would reply after the member had
    given up and suspected it, so it answers within the member's deadline (TIMEOUT here)."""
    import time as _time

    from swarm_node.protocol.pb import swarm_node_rounds_pb2 as rpb
    from swarm_node.protocol.averaging.transaction import JoinStatus, RoundCoordinator

    class T:
        peer_id = "a"

    async def go():
        rc = RoundCoordinator(T(), "run", timeout_s=1.0, grace_s=1.0, allreduce=None, leader_fn=lambda: "a",
                              expected_fn=lambda: {"b", "c"}, state_fn=lambda: (3, "h"))
        t0 = _time.monotonic()
        # one round ahead of a leader that never catches up, in a round the leader never joins
        reply = await rc._admit(rpb.RoundJoin(run_id="run", round=3, phi_hash="h", weight=1.0, num_elements=4), "b")
        return reply, _time.monotonic() - t0

    reply, took = asyncio.run(go())
    assert reply.status == JoinStatus.ROUND_STATUS_TIMEOUT and took < 1.9, (reply, took)


def test_in_a_quorum_a_late_leader_does_not_set_the_pace_and_then_downloads_the_commit():
    """The deadline quorum: the grace window opens at the first join, not when the leader is
    ready, so members go on without a slow leader. The leader still coordinates (freeze, votes);
    its own late join waits for the decision and, on commit, is told to resync from a member.
    Without the quorum the window waits for the leader: no freeze without it."""
    from swarm_node.protocol.pb import swarm_node_rounds_pb2 as rpb
    from swarm_node.protocol.averaging.transaction import JoinStatus, RoundCoordinator

    class T:
        peer_id = "a"

    def join() -> rpb.RoundJoin:
        return rpb.RoundJoin(run_id="run", round=3, phi_hash="h", weight=1.0, num_elements=4)

    async def go(quorum: bool):
        rc = RoundCoordinator(T(), "run", timeout_s=0.6, grace_s=0.3, allreduce=None, leader_fn=lambda: "a",
                              expected_fn=lambda: {"b", "c"}, state_fn=lambda: (3, "h"), open_on_first_join=quorum)
        replies = await asyncio.gather(rc._admit(join(), "b"), rc._admit(join(), "c"))
        if not quorum:
            return replies, None
        group_id = replies[0].group_id
        late = asyncio.create_task(rc._admit(join(), "a"))  # the leader is ready only now
        await asyncio.sleep(0.05)
        assert not late.done()  # it waits for the members' votes
        votes = [rc._decide(p, rpb.CommitVote(group_id=group_id, complete=True, result_hash="x")) for p in "bc"]
        decisions = await asyncio.gather(*votes)
        return replies, (decisions, await late)

    replies, _ = asyncio.run(go(quorum=False))
    assert all(r.status == JoinStatus.ROUND_STATUS_TIMEOUT for r in replies), replies
    replies, (decisions, leader) = asyncio.run(go(quorum=True))
    assert all(r.status == JoinStatus.ROUND_STATUS_OK and list(r.group) == ["b", "c"] for r in replies)
    assert all(d.commit for d in decisions)
    assert leader.status == JoinStatus.ROUND_STATUS_RESYNC and leader.leader_hint == "b" and leader.round == 4


def test_a_leader_that_adopted_a_state_at_a_lower_round_number_forms_one_group_and_commits():
    """After a heal the lowest id may have run ahead alone (rounds of one, so higher round
    numbers but less merged work) and adopts the others' state at a lower round number. Its
    book of rounds still holds its own, higher ones: the adopted round must neither be pruned as
    the oldest (each join would then open a round of its own, none ever frozen with the others,
    and the leader's vote would find no round) nor reuse a round of that number from the
    abandoned history (frozen, decided, with another group)."""
    from swarm_node.protocol.pb import swarm_node_rounds_pb2 as rpb
    from swarm_node.protocol.averaging.transaction import JoinStatus, RoundCoordinator

    class T:
        peer_id = "a"

    state = {"round": 12, "hash": "solo"}

    async def go(adopted_round: int):
        rc = RoundCoordinator(T(), "run", timeout_s=0.6, grace_s=0.3, allreduce=None, leader_fn=lambda: "a",
                              expected_fn=lambda: {"b", "c"}, state_fn=lambda: (state["round"], state["hash"]))
        for r in range(7, 13):  # the leader's rounds of one, while it was cut off
            solo = rc._round(r, "solo")
            solo.joined = {"a": 1.0}
            solo.freeze("run")
            solo.vote("a", True, "x")
            assert solo.decide() is True
        state.update(round=adopted_round, hash="adopted")  # it adopted the majority's state

        def join() -> rpb.RoundJoin:
            return rpb.RoundJoin(run_id="run", round=adopted_round, phi_hash="adopted", weight=1.0, num_elements=4)

        replies = await asyncio.gather(*(rc._admit(join(), p) for p in "abc"))
        assert all(r.status == JoinStatus.ROUND_STATUS_OK for r in replies), replies
        assert {tuple(r.group) for r in replies} == {("a", "b", "c")}
        assert len({r.group_id for r in replies}) == 1
        decisions = await asyncio.gather(*(
            rc._decide(p, rpb.CommitVote(group_id=replies[0].group_id, complete=True, result_hash="y")) for p in "abc"))
        assert all(d.commit for d in decisions), decisions

    asyncio.run(go(adopted_round=4))  # below every round in the leader's book (pruned at once before)
    state.update(round=12, hash="solo")
    asyncio.run(go(adopted_round=9))  # a number its own history committed with a group of one
