"""Programs that run beside the node as their own processes (py-libp2p lives only there).

  mdns.py        LAN discovery: advertise this node by mDNS and find nodes of the same run
  gossip.py      rollout gossip for `sapo`: gossipsub over py-libp2p
  runtime.py     what both programs share: arguments, identity, event output, lifetime
  supervisor.py  node side: spawn, read, restart and stop one sidecar process
Their node-side clients, `swarm_node.discovery` and `swarm_node.strategies.sapo.gossip`,
run them through supervisor.py.
"""
