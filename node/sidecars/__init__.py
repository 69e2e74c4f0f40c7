"""Programs that run beside the node as their own processes (py-libp2p lives only here).

  mdns.py    LAN discovery: advertise this node by mDNS and find nodes of the same run
  gossip.py  rollout gossip for `sapo`: gossipsub over py-libp2p
Their node-side clients are `swarm_node.discovery` and `swarm_node.strategies.sapo.gossip`.
"""
