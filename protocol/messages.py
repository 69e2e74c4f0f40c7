"""The message types peers exchange, by protocol: the one place that names generated code.

Strategies and the node import the protobuf messages from here, never from `pb/`, so a
regenerated or renamed module changes one file.

  wire      tensors, state transfer, pings (swarm_node_wire.proto)
  rounds    round transactions and NoLoCo pairs (swarm_node_rounds.proto)
  gradcode  coded gradient rounds (swarm_node_gradcode.proto)
  pipeline  SWARM stage calls and records (swarm_node_pipeline.proto)
"""
from __future__ import annotations

from swarm_node.protocol.pb import swarm_node_gradcode_pb2 as gradcode
from swarm_node.protocol.pb import swarm_node_pipeline_pb2 as pipeline
from swarm_node.protocol.pb import swarm_node_rounds_pb2 as rounds
from swarm_node.protocol.pb import swarm_node_wire_pb2 as wire

__all__ = ["gradcode", "pipeline", "rounds", "wire"]
