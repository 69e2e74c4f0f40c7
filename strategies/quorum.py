"""The run-long quorum of the step-synchronous strategies (sync, gradcode).

`--min-peers` is only a start barrier. Afterwards a peer that sees too few of the swarm must
not go on alone: each step would be a fork that the next resync throws away. The rule,
checked from this peer's own membership view before every step:

  needed = --quorum, when set (> 0)
         = a strict majority of the last committed round's group, less the peers that left
           it gracefully (a LEAVING record) since;
           before its first commit: 1 for the swarm's first peer, 2 for one that joined with
           --initial-peers (a restarted peer must not train on alone from its old checkpoint).

Of two sides of a split at most one keeps stepping. A swarm that loses half its peers at
once by crashes waits until peers come back (`--quorum 1`: train on whatever is left);
graceful leaves lower the bar, so a swarm drained peer by peer goes on to the last one.
"""
from __future__ import annotations

from dataclasses import dataclass


def majority(group_size: int) -> int:
    """Smallest count that is more than half of `group_size` (1 for an empty group)."""
    return group_size // 2 + 1 if group_size > 0 else 1


@dataclass
class QuorumRule:
    fixed: int = 0  # --quorum; 0 = majority of the last committed group
    joined: bool = False  # came in through --initial-peers (not the swarm's first peer)
    last_group: int = 0  # contributors of the last round this peer saw commit
    committed_at: float = 0.0  # DHT time of that commit (graceful leaves after it lower the bar)

    def committed(self, group_size: int, at: float) -> None:
        if group_size > 0:
            self.last_group, self.committed_at = group_size, at

    def needed(self, left_since_commit: int = 0) -> int:
        if self.fixed > 0:
            return self.fixed
        if self.last_group <= 0:
            return 2 if self.joined else 1
        return majority(max(1, self.last_group - left_since_commit))
