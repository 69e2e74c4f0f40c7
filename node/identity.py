"""The node's persistent libp2p identity: one RSA key file per state dir.

The same file keeps the peer ID across restarts (peers and dashboards keep recognising
the node) and is readable by py-libp2p for signing. Created with mode 0600; a key file
readable by others is refused, because whoever holds it can impersonate the node. The key
type and the peer id derivation belong to protocol/signing.py; hivemind writes the file.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from hivemind.p2p import P2P

from swarm_node.protocol.signing import IDENTITY_KEY_TYPE, Signer


class IdentityError(Exception):
    pass


@dataclass(frozen=True)
class Identity:
    path: Path
    peer_id: str  # base58


def ensure_identity(path: Path) -> Identity:
    """Load the key at `path`, creating it (mode 0600) if it does not exist."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        P2P.generate_identity(str(path))  # writes a libp2p-protobuf RSA key (mode 0400)
        os.chmod(path, 0o600)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise IdentityError(f"{path} is accessible by other users (mode {mode:o}); run: chmod 600 {path}")
    try:
        signer = Signer.from_private_key_proto(path.read_bytes())
    except Exception as e:
        raise IdentityError(f"{path} is not a libp2p private key: {e}") from None
    if signer.public_key.key_type is not IDENTITY_KEY_TYPE:  # hivemind's P2P derives the id as for RSA
        raise IdentityError(f"{path} is a {signer.public_key.key_type.name} key; a node identity is "
                            f"{IDENTITY_KEY_TYPE.name}")
    return Identity(path, signer.peer_id)
