"""Every wait of a synchronization exchange, derived from the one setting `round_timeout_s`.

A slow link or a loaded peer stretches all of them together; none is a bare multiple written
at its call site. Each property is one kind of wait, named for what it bounds.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Deadlines:
    round_s: float  # `round_timeout_s`: the longest wait for the other peers in one round

    @property
    def gather(self) -> float:
        """A leader or aggregator waits this long for the others' parts after its own."""
        return self.round_s

    @property
    def request(self) -> float:
        """One request and its reply to a single peer (a stage call, a fragment pull)."""
        return self.round_s

    @property
    def backward(self) -> float:
        """A pipeline backward call: the stage recomputes its forward, then runs backward."""
        return self.round_s * 2.5

    @property
    def shard_parts(self) -> float:
        """A reducer waits this long for every part of its shard; the leader, for every vote."""
        return self.round_s * 2

    @property
    def in_flight_round(self) -> float:
        """A checkpoint waits this long for a round in flight to settle."""
        return self.round_s * 2

    @property
    def exchange(self) -> float:
        """A whole all-reduce or pair exchange, dial and upload included; a member's commit vote."""
        return self.round_s * 2 + 5

    @property
    def left_out_leader(self) -> float:
        """A leader left out of its own round waits this long for the round's decision."""
        return self.round_s * 2 + 1

    @property
    def star_reply(self) -> float:
        """A member's wait for a star leader's averaged reply: its gather, a slow upload, the reply."""
        return self.round_s * 2 + 10

    @property
    def coded_partial(self) -> float:
        """One coded partial gradient sent to the aggregator, with its acknowledgement."""
        return self.round_s + 10

    @property
    def state_download(self) -> float:
        """One full state download (weights, optimizer, strategy state) from a peer."""
        return self.round_s * 3
