"""`sapo`: RL post-training where peers share rollouts, not weights.

  strategy.py    SapoStrategy: the round loop (generate, publish, collect, train)
  math.py        group advantages, the clipped GRPO objective, the I+J training set
  policy.py      the policy: the built-in byte GPT, or a local Hugging Face causal LM
  tasks.py       verifiable tasks: question, truth, verifier
  records.py     signed rollout groups, per-round manifests, the round clock
  gossip.py      node side of rollout gossip (the sidecar is `swarm_node.sidecars.gossip`)
  hf_fixture.py  a tiny HF causal LM built offline, for tests and demos
  options.py     the strategy's settings (tasks, group and round shape, training, the policy)
  churn_profile.py  its scenarios and flags in the churn lab
"""
