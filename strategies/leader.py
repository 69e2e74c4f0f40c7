"""Who coordinates a round: the lowest peer id among live, *online* peers of a strategy.

Every peer derives the same answer from its membership view, so no election messages
are needed; views converge within one announce interval. Joiners (state `joining`) are
not eligible while anyone is online, so a fresh joiner never leads the swarm away from
the model everyone else holds. A peer that failed us is skipped ("suspect") until its
record would have expired anyway. When nobody is online (a fresh swarm, or one re-forming
after its peers fell below the quorum), anyone may lead; with `prefer_progress` the peers at
the highest step (within PROGRESS_SLACK_STEPS) come first, so a re-forming swarm keeps its most
advanced replica instead of resyncing everyone to the lowest id's older one.
"""
from __future__ import annotations

import time

from swarm_node.strategies.base import StrategyContext

PROGRESS_SLACK_STEPS = 10  # prefer_progress: peers this close to the highest step count as level


def pick_leader(candidates, suspects=()) -> str | None:
    eligible = sorted(set(candidates) - set(suspects))
    return eligible[0] if eligible else None


class LeaderElection:
    def __init__(self, ctx: StrategyContext, strategy_name: str, *, prefer_progress: bool = False):
        self.ctx, self.strategy_name, self.prefer_progress = ctx, strategy_name, prefer_progress
        self.suspects: dict[str, float] = {}  # peer -> monotonic time until which it is skipped
        self.committed_with: set[str] = set()  # members of our last committed round: online, whatever records say

    def suspect(self, peer: str) -> None:
        if peer != self.ctx.peer_id:
            self.suspects[peer] = time.monotonic() + self.ctx.node.ttl_s

    def live_suspects(self) -> set[str]:
        now = time.monotonic()
        self.suspects = {p: t for p, t in self.suspects.items() if t > now}
        return set(self.suspects)

    def peers(self) -> list:
        return [m for m in self.ctx.peers.others() if m.record.strategy == self.strategy_name]

    def mark_committed(self, group: list[str]) -> None:
        """Peers that just committed a round with us are online, even before their records
        say so (records lag by up to one announce interval)."""
        self.committed_with = set(group) - {self.ctx.peer_id}

    def not_leader(self, peer: str) -> None:
        """`peer`, which we took for the leader, says it is not: it does not count itself online,
        so our having committed with it says nothing any more. Two peers that each counted the
        other as leader (one of them still rejoining, online only by our commit) waited forever."""
        self.committed_with.discard(peer)

    def forget_commits(self) -> None:
        """This peer fell out of step with its group (below the quorum): what it committed before
        says nothing about who is online now. Two peers that each still counted the other as
        online, from rounds long past, would each send the other NOT_LEADER forever."""
        self.committed_with = set()

    def online_peers(self) -> list[str]:
        return [m.peer_id for m in self.peers() if m.record.state == "online" or m.peer_id in self.committed_with]

    def expected(self) -> set[str]:
        return {m.peer_id for m in self.peers()} | {self.ctx.peer_id}

    def leader(self) -> str:
        me = self.ctx.peer_id
        online = self.online_peers()
        if self.ctx.progress.state == "online":
            online.append(me)
        if not online:  # fresh swarm: all start from the same seed, so anyone may lead
            candidates = [(m.record.step, m.peer_id) for m in self.peers()] + [(self.ctx.trainer.step, me)]
            top = max(step for step, _ in candidates) if self.prefer_progress else None
            # within a slack: records lag, and peers a few steps apart must still agree (lowest id)
            online = [p for step, p in candidates if top is None or step >= top - PROGRESS_SLACK_STEPS]
        return pick_leader(online, self.live_suspects() - {me}) or me
