"""Built-in churn scenarios, one table per strategy.

A `Profile` says how to run a strategy under churn (extra node flags, how many steps, whether
surviving replicas must end bit-identical) and which named scenarios it has. Adding a strategy
is one entry in `PROFILES`; a strategy without an entry gets `GENERIC` scenarios and no
consistency expectation. Times are seconds after training started; the default node flags
in `churn.DEFAULT_NODE_ARGS` use 1 s heartbeats and 4 s record lifetimes, so a dead peer is
dropped within about 5 s and a healed one re-bootstraps within a few watchdog ticks.

`at step N` events are used where the strategy's pace is what matters (sync's steps are
rounds); `at Ns` where wall-clock churn is the point (partitions must outlast record TTLs).
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Kill one peer, drain another, bring the killed one back with its identity, cut a third off
# the network for 12 s and heal it. On loopback the partition/heal lines are skipped (warned).
CHURN = """\
at step 15 kill n1
at 8s term n2
at 14s restart n1
at 18s partition n3
at 30s heal n3
"""

# The O-8 isolation scenario: one peer alone for ~16 s, then healed.
PARTITION = """\
at 4s partition n2
at 20s heal n2
"""

KILL = """\
at step 10 kill n1
at 10s restart n1
"""


@dataclass(frozen=True)
class Profile:
    strategy: str
    node_args: tuple[str, ...] = ()
    max_steps: int = 0  # 0 = run until the scenario ends (then every node is drained)
    # How survivors must agree: "param_hash" = one final param hash at --max-steps (from
    # summary.json); "phi_hash" = one outer-weight hash per round in /status last_round, for the
    # rounds after the last event; None = replicas differ by design.
    consistency: str | None = None
    # Which loss must fall through the churn: "val" (held-out, from summary.json) or "train" (from
    # /status), for strategies whose nodes cannot evaluate the whole model (a SWARM stage server).
    loss: str = "val"
    peers: int = 4  # peers the built-in scenarios are run with (by the tests; `simulate --peers` overrides)
    scenarios: dict[str, str] = field(default_factory=dict)


GENERIC = {"churn": CHURN, "partition": PARTITION, "kill": KILL}

PROFILES: dict[str, Profile] = {
    # sync averages gradients every step, so replicas stay bit-identical; everyone stops at
    # --max-steps, far enough out that a partitioned peer is healed and resynchronised before
    # anyone finishes: an isolated sync *leader* trains alone at full speed (measured ~40
    # steps/s with the tiny model, vs ~6-20 in a swarm), and at 400 it finished while cut off.
    "sync": Profile("sync", max_steps=800, consistency="param_hash", scenarios=GENERIC),
    # DiLoCo: H=5 inner steps; the shared φ is compared round by round while the swarm runs.
    "diloco": Profile("diloco", ("--inner-steps", "5"), consistency="phi_hash", scenarios=GENERIC),
    "streaming-diloco": Profile("streaming-diloco", ("--inner-steps", "10", "--fragments", "2"),
                                consistency="phi_hash", scenarios=GENERIC),
    "noloco": Profile("noloco", ("--inner-steps", "5"), scenarios=GENERIC),  # per-peer φ by design
    # gradcode: the aggregator's one decoded tensor per step keeps replicas bit-identical; like
    # sync, a peer cut off trains alone, fast (measured ~65 steps/s: from step ~200 to 1000 within
    # the 12 s partition), so --max-steps lies well beyond what it can reach before the heal.
    "gradcode": Profile("gradcode", ("--gc-stragglers", "1"), max_steps=2000, consistency="param_hash",
                        scenarios=GENERIC),
    # SWARM: 3 stages of one layer; each node serves a stage (stage-0 peers train), so only the
    # trainers' training loss means anything, and replicas of a stage differ between gossip rounds.
    # Rebalancing is off so the churn, not a move, decides who serves what.
    "swarm": Profile("swarm", ("--n-layer", "3", "--stages", "3", "--micro-batches", "2", "--d-model", "32",
                               "--rebalance-interval-s", "0"), loss="train", peers=5, scenarios=GENERIC),
}


def profile_for(strategy: str) -> Profile:
    return PROFILES.get(strategy, Profile(strategy, scenarios=GENERIC))
