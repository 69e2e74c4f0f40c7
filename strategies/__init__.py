"""Synchronization strategies: plain tensor math plus a thin driver that maps rounds onto the transport.

  base.py            Strategy (the interface); the peers/quorum wait every loop uses
  context.py         StrategyContext, the narrow view of the node a strategy gets; NodeSettings, Progress
  registry.py        find strategies by name (built-ins and the `swarm_node.strategies` entry points)
  options.py         StrategyOptions: a strategy's own settings, merged into `swarm-node join`
  churn_profile.py demo_profile.py page_panel.py   how the churn lab and `swarm-node demo` run and
                     judge a strategy; what it shows on the node's page
  solo.py sync.py    the baselines; data_parallel.py is their shared step loop
  leader.py          who coordinates a round; quorum.py the run-long quorum of sync and gradcode
Subpackages, one per family:
  lowcomm/   diloco, streaming-diloco, noloco and their outer-loop math
  swarm/     SWARM pipeline parallelism with CheckFree stage recovery
  sapo/      rollout sharing for RL post-training
  gradcode/  gradient coding for stragglers
"""
