"""swarm-node: a peer daemon for decentralized swarm training."""
__version__ = "0.1.0"
