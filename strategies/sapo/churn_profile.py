"""SAPO in the churn lab and the demo: wall-clock scenarios and the node flags of a fast, measurable run."""
from __future__ import annotations

from swarm_node.strategies.churn_profile import ChurnProfile
from swarm_node.strategies.demo_profile import DemoProfile

# SAPO: steps are GRPO rounds (one per --sapo-round-s, after the warm-start steps), so events are in
# wall-clock seconds, placed after the first rounds (a sidecar takes up to ~13 s to start on a loaded
# box, and the reward before the churn must be measured). The partition (12 s) lasts 3 rounds.
SAPO_SCENARIOS = {
    "churn": "at 24s kill n1\nat 30s term n2\nat 36s restart n1\nat 44s partition n3\nat 56s heal n3\n",
    "partition": "at 24s partition n2\nat 40s heal n2\n",
    "kill": "at 24s kill n1\nat 30s restart n1\n",
}
SAPO_CHURN = SAPO_SCENARIOS["churn"]

# Near the fast configuration of tests/live/test_sapo_live.py (4 s rounds, 20 warm-start steps, a format reward
# so that a tiny policy's reward moves within a minute), with 6 questions x 8 completions, 4 local + 4
# external groups and 2 PPO epochs (2 steps a round): 48 completions a round make the mean reward less
# noisy, and cost little (6 new tokens on a 1-layer model; a round's time is the gossip deadline).
# In-process (4 peers, add4, 3 seeds) the mean reward per completion went 0.09-0.105 over rounds 1-6 ->
# 0.21-0.22 over rounds 15-21; with 1 epoch the rise was 0.14-0.20 and, live, once only 0.096 -> 0.102.
SAPO_ARGS = ("--sapo-round-s", "4", "--sapo-group-size", "8", "--sapo-questions", "6", "--sapo-local-groups", "4",
             "--sapo-external-groups", "4", "--sapo-warmstart-steps", "20", "--sapo-format-reward", "0.1",
             "--sapo-ppo-epochs", "2")

# peers share rollouts, not weights, so replicas differ by design and progress is reward
SAPO_PROFILE = ChurnProfile(node_args=SAPO_ARGS, loss="reward",
                            scenarios=dict(SAPO_SCENARIOS))

# The demo, in bench_sapo's regime (where 4/4 reached 1.5-1.9x the cumulative reward of 8/0 over 100
# rounds): Q = 8 groups of G = 8 a round, 2.5 s rounds, the default 150 warm-start steps and 4 PPO epochs;
# 4 own + 4 external groups against the same peer alone with 8 own groups and none shared (8/0). --max-steps
# counts policy steps: 150 warm-start steps, then 4 a round, so 350 steps = 50 rounds (about 2 minutes).
_DEMO_ARGS = ("--sapo-round-s", "2.5", "--sapo-group-size", "8", "--sapo-questions", "8")
SAPO_DEMO = DemoProfile(
    steps=350, measure="reward", baseline="sapo",
    node_args=(*_DEMO_ARGS, "--sapo-local-groups", "4", "--sapo-external-groups", "4"),
    baseline_args=(*_DEMO_ARGS, "--sapo-local-groups", "8", "--sapo-external-groups", "0"),
    shows="peers share their rollouts: each trains on 4 groups of its own and 4 of others' (against 8 of its own)")
