"""The churn lab and local launchers: real daemons on one machine, for tests, demos and benches.

  launcher.py         NodeProcess / Swarm: start, watch and always reap `swarm-node join` processes
  scenario.py         the scenario language (timed events)
  churn.py            ChurnRunner: play a scenario against a swarm and judge it (loopback or netns)
  churn_scenarios.py  each installed strategy's ChurnProfile (declared on its class)
  netlab.py           network namespaces, veth, bridge, nftables partitions, tbf shaping (root)
  simulate.py         `swarm-node simulate`
  demo.py             `swarm-node demo` and `demo --compare`
  demo_report.py      the demo's verdict: the strategy's own measure, swarm against its baseline
"""
