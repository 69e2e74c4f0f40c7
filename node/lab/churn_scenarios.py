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

# Isolation: one peer alone for ~16 s, then healed.
PARTITION = """\
at 4s partition n2
at 20s heal n2
"""

KILL = """\
at step 10 kill n1
at 10s restart n1
"""

# SAPO: steps are GRPO rounds (one per --sapo-round-s, after the warm-start steps), so events are in
# wall-clock seconds, placed after the first rounds (a sidecar takes up to ~13 s to start on a loaded
# box, and the reward before the churn must be measured). The partition (12 s) lasts 3 rounds.
SAPO_CHURN = """\
at 24s kill n1
at 30s term n2
at 36s restart n1
at 44s partition n3
at 56s heal n3
"""

SAPO_PARTITION = """\
at 24s partition n2
at 40s heal n2
"""

SAPO_KILL = """\
at 24s kill n1
at 30s restart n1
"""

# Near the fast configuration of tests/live/test_sapo_live.py (4 s rounds, 20 warm-start steps, a format reward
# so that a tiny policy's reward moves within a minute), with 6 questions x 8 completions, 4 local + 4
# external groups and 2 PPO epochs (2 steps a round): 48 completions a round make the mean reward less
# noisy, and cost little (6 new tokens on a 1-layer model; a round's time is the gossip deadline).
# In-process (4 peers, add4, 3 seeds) the mean reward per completion went 0.09-0.105 over rounds 1-6 ->
# 0.21-0.22 over rounds 15-21; with 1 epoch the rise was 0.14-0.20 and, live, once only 0.096 -> 0.102.
SAPO_ARGS = ("--sapo-round-s", "4", "--sapo-group-size", "8", "--sapo-questions", "6", "--sapo-local-groups", "4",
             "--sapo-external-groups", "4", "--sapo-warmstart-steps", "20", "--sapo-format-reward", "0.1",
             "--sapo-ppo-epochs", "2")


@dataclass(frozen=True)
class Profile:
    strategy: str
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
    scenarios: dict[str, str] = field(default_factory=dict)


GENERIC = {"churn": CHURN, "partition": PARTITION, "kill": KILL}

PROFILES: dict[str, Profile] = {
    # sync averages gradients every step, so replicas stay bit-identical; everyone stops at
    # --max-steps, far enough out that a partitioned peer is healed and resynchronised before
    # anyone finishes: an isolated sync *leader* trains alone at full speed (measured ~40
    # steps/s with the tiny model, vs ~6-20 in a swarm), and at 400 it finished while cut off.
    # sync averages gradients every step, so replicas stay bit-identical. The run is bounded by
    # events, not steps: a cut-off peer waits below the quorum instead of training alone, and once
    # the scenario settled every survivor drains at one common step (the runner's stop_together),
    # where their param hashes are compared. No step count decides the outcome, however fast the box.
    "sync": Profile("sync", consistency="param_hash", stop_together=True, cut_off_holds=True, scenarios=GENERIC),
    "diloco": Profile("diloco", ("--inner-steps", "5"), consistency="phi_hash", scenarios=GENERIC),
    "streaming-diloco": Profile("streaming-diloco", ("--inner-steps", "10", "--fragments", "2"),
                                consistency="phi_hash", scenarios=GENERIC),
    "noloco": Profile("noloco", ("--inner-steps", "5"), scenarios=GENERIC),  # per-peer φ by design
    # gradcode: the aggregator's one decoded tensor per step keeps replicas bit-identical; judged like
    # sync (a cut-off peer waits below the quorum; survivors drain together at one step).
    "gradcode": Profile("gradcode", ("--gc-stragglers", "1"), consistency="param_hash", stop_together=True,
                        cut_off_holds=True, scenarios=GENERIC),
    # SWARM: 3 stages of one layer; each node serves a stage (stage-0 peers train), so only the
    # trainers' training loss means anything, and replicas of a stage differ between gossip rounds.
    # Rebalancing is off so the churn, not a move, decides who serves what. 4 peers for 3 stages:
    # after the kill and the drain only 2 live, so a stage stays empty until the restart, which must
    # take it (not become a trainer); with fewer peers than stages a stage stays empty.
    "swarm": Profile("swarm", ("--n-layer", "3", "--stages", "3", "--micro-batches", "2", "--d-model", "32",
                               "--rebalance-interval-s", "0"), loss="train", peers=4, scenarios=GENERIC),
    # SAPO: peers share rollouts, not weights, so replicas differ by design and progress is reward.
    "sapo": Profile("sapo", SAPO_ARGS, loss="reward",
                    scenarios={"churn": SAPO_CHURN, "partition": SAPO_PARTITION, "kill": SAPO_KILL}),
}


def profile_for(strategy: str) -> Profile:
    return PROFILES.get(strategy, Profile(strategy, scenarios=GENERIC))
