"""swarm-node: a peer daemon for decentralized swarm training (this package is `swarm_node`).

The daemon (this folder):
  cli.py            `swarm-node` command line: parse, validate, hand over (__main__.py: `python -m`)
  config.py         NodeConfig (every `join` flag, env var and TOML key) and the run spec
  daemon.py         Node: startup -> run -> drain on one event loop plus one compute thread
  network.py        p2pd + in-process DHT node; the isolation watchdog
  membership.py     heartbeat records, the membership view, the run-spec check
  health.py metrics.py control.py status.py tables.py logs.py   what operators see
  identity.py processes.py preflight.py discovery.py discovery_record.py
Subpackages:
  train/     model, data, trainer, device: local training on one device
  sidecars/  the mDNS and rollout-gossip programs (each runs as its own process)
  lab/       churn runner, network-namespace lab, scenarios, simulate, demo, launcher
The wire layer is `swarm_node.protocol`; strategies are `swarm_node.strategies`.
"""
__version__ = "0.1.0"
