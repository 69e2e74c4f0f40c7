"""How the churn lab runs and judges a strategy: its `ChurnProfile`, and the generic scenarios.

A strategy class names its profile (`Strategy.churn_profile`); one without gets the generic
scenarios and no consistency expectation. Times are seconds after training started; the
lab's default node flags use 1 s heartbeats and 4 s record lifetimes, so a dead peer is
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

# Isolation: one peer alone for ~16 s, then healed.
PARTITION = """\
at 4s partition n2
at 20s heal n2
"""

KILL = """\
at step 10 kill n1
at 10s restart n1
"""

GENERIC = {"churn": CHURN, "partition": PARTITION, "kill": KILL}


@dataclass(frozen=True)
class ChurnProfile:
    strategy: str = ""  # filled in from the registry name by the lab
    node_args: tuple[str, ...] = ()
    max_steps: int = 0  # 0 = run until the scenario ends (then every node is drained)
    # drain every survivor at one common step once the scenario settled (param_hash is compared there)
    stop_together: bool = False
    # a partitioned peer must hold still once it knows it is cut off (the run-long quorum)
    cut_off_holds: bool = False
    # How survivors must agree: "param_hash" = one final param hash at --max-steps (from
    # summary.json); "phi_hash" = one outer-weight hash per round in /status last_round, for the
    # rounds after the last event; None = replicas differ by design.
    consistency: str | None = None
    # Which loss must fall through the churn: "val" (held-out, from summary.json) or "train" (from
    # /status), for strategies whose nodes cannot evaluate the whole model (a SWARM stage server);
    # "reward" for SAPO, whose progress is reward: the mean reward per completion must RISE from the
    # rounds before the churn to the rounds after it, every survivor must keep completing rounds and
    # train on other peers' rollouts again, received by gossip (see churn.ChurnRunner._judge_reward).
    loss: str = "val"
    peers: int = 4  # peers the built-in scenarios are run with (by the tests; `simulate --peers` overrides)
    scenarios: dict[str, str] = field(default_factory=lambda: dict(GENERIC))
