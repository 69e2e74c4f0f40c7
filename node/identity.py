"""The node's persistent libp2p identity: one RSA key file per state dir.

The same file keeps the peer ID across restarts (peers and dashboards keep recognising
the node) and is readable by py-libp2p for signing. Created with mode 0600; a key file
readable by others is refused, because whoever holds it can impersonate the node.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from hivemind.p2p import P2P, PeerID


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
        peer_id = PeerID.from_identity(path.read_bytes()).to_base58()
    except Exception as e:
        raise IdentityError(f"{path} is not a libp2p private key: {e}") from None
    return Identity(path, peer_id)
