"""The LAN-discovery advertisement: what one node tells another about how to join it.

A node's mDNS sidecar (node/sidecars/mdns.py) serves this record over a py-libp2p stream. The
sidecar's libp2p key *is* the node's identity key, so the secure channel proves the speaker;
the record is also signed by that key, so (run id, join multiaddrs) stays bound to the peer id
when cached or relayed. Wire form: msgpack `[VERSION, run_id, peer_id, [maddr, ...], signature]`;
the signature covers `msgpack([VERSION, run_id, peer_id, maddrs])` in `Context.DISCOVERY_ADVERT`.

Invariants (checked by `decode_advert`; each failure is an `AdvertRejected` with a bounded reason):
- at most `MAX_ADVERT_BYTES` encoded (enforced at encode time too); exact types (1..`MAX_MADDRS`
  str of at most `MAX_MADDR_CHARS`; a bool or float never passes for anything else);
- run id equals ours (`wrong_run`), peer id equals the authenticated remote (`peer_mismatch`),
  every multiaddr is `/ip4|ip6|dns*/.../tcp/N/p2p/<that peer id>`; the signature verifies
  under the remote's public key, which must be that peer id's key (`bad_signature`).
Pure: no libp2p import (its `crypto.pb` clashes with hivemind's); keys come from protocol.signing.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
import msgpack

from swarm_node.protocol.signing import Context, PublicKey, Signer, verify

VERSION = 1
MAX_ADVERT_BYTES = 4096
MAX_MADDRS = 8
MAX_MADDR_CHARS = 256
MAX_SIGNATURE_BYTES = 1024  # RSA-4096 is 512 bytes; Ed25519 is 64
REJECT_REASONS = ("malformed", "too_large", "bad_version", "wrong_run", "peer_mismatch", "bad_maddr",
                  "bad_signature")
_ADDR_PROTOCOLS = ("ip4", "ip6", "dns", "dns4", "dns6")


class AdvertRejected(ValueError):
    """A record that must be ignored; `reason` is one of REJECT_REASONS (a metric label)."""

    def __init__(self, reason: str, detail: str):
        assert reason in REJECT_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True, slots=True)
class Advert:
    run_id: str
    peer_id: str
    maddrs: tuple[str, ...]


def _signed_part(run_id: str, peer_id: str, maddrs: list[str] | tuple[str, ...]) -> bytes:
    return msgpack.packb([VERSION, run_id, peer_id, list(maddrs)], use_bin_type=True)


def encode_advert(advert: Advert, signer: Signer) -> bytes:
    """Sign and serialise; raises ValueError if the record itself breaks an invariant."""
    check_maddrs(advert.maddrs, advert.peer_id)
    signature = signer.sign(Context.DISCOVERY_ADVERT, _signed_part(advert.run_id, advert.peer_id, advert.maddrs))
    blob = msgpack.packb([VERSION, advert.run_id, advert.peer_id, list(advert.maddrs), signature],
                         use_bin_type=True)
    if len(blob) > MAX_ADVERT_BYTES:
        raise ValueError(f"advertisement is {len(blob)} bytes, more than {MAX_ADVERT_BYTES}")
    return blob


def check_maddrs(maddrs: object, peer_id: str) -> None:
    """Raise AdvertRejected('bad_maddr') unless maddrs are dialable peer multiaddrs of peer_id."""
    if not isinstance(maddrs, (list, tuple)) or not 1 <= len(maddrs) <= MAX_MADDRS:
        raise AdvertRejected("bad_maddr", f"expected 1..{MAX_MADDRS} multiaddrs")
    suffix = f"/p2p/{peer_id}"
    for m in maddrs:
        if type(m) is not str or len(m) > MAX_MADDR_CHARS:
            raise AdvertRejected("bad_maddr", f"not a multiaddr string of at most {MAX_MADDR_CHARS} chars")
        parts = m.split("/")
        # '/ip4/10.0.0.1/tcp/31337/p2p/Qm..' -> ['', 'ip4', '10.0.0.1', 'tcp', '31337', 'p2p', 'Qm..']
        if (len(parts) != 7 or parts[0] or parts[1] not in _ADDR_PROTOCOLS or not parts[2] or parts[3] != "tcp"
                or not parts[4].isdigit() or not 0 < int(parts[4]) < 65536 or not m.endswith(suffix)):
            raise AdvertRejected("bad_maddr", f"{m[:80]!r} is not /ip4|ip6|dns/HOST/tcp/PORT{suffix[:12]}...")


def decode_advert(blob: bytes, *, expected_run_id: str, remote_peer_id: str,
                  remote_key: PublicKey | bytes | None) -> Advert:
    """Validate a received record strictly; raise AdvertRejected with the first failed check.
    `remote_key` is the key the secure channel authenticated (None: only an Ed25519 id's inlined key)."""
    if len(blob) > MAX_ADVERT_BYTES:
        raise AdvertRejected("too_large", f"{len(blob)} bytes > {MAX_ADVERT_BYTES}")
    try:
        fields = msgpack.unpackb(blob, raw=False, use_list=True, strict_map_key=True,
                                 max_bin_len=MAX_SIGNATURE_BYTES, max_str_len=MAX_ADVERT_BYTES)
    except Exception as e:  # msgpack raises several types for garbage and for limits
        raise AdvertRejected("malformed", f"not msgpack: {type(e).__name__}") from None
    if not isinstance(fields, list) or len(fields) != 5:
        raise AdvertRejected("malformed", "expected [version, run_id, peer_id, maddrs, signature]")
    version, run_id, peer_id, maddrs, signature = fields
    if type(version) is not int:
        raise AdvertRejected("malformed", "version is not an int")
    if version != VERSION:
        raise AdvertRejected("bad_version", f"version {version}, we speak {VERSION}")
    if type(run_id) is not str or type(peer_id) is not str or type(signature) is not bytes:
        raise AdvertRejected("malformed", "run_id/peer_id must be str and signature bytes")
    if run_id != expected_run_id:
        raise AdvertRejected("wrong_run", f"run {run_id[:64]!r}, ours is {expected_run_id!r}")
    if peer_id != remote_peer_id:
        raise AdvertRejected("peer_mismatch", f"record names {peer_id[:60]}, the channel is {remote_peer_id}")
    check_maddrs(maddrs, peer_id)
    verdict = verify(Context.DISCOVERY_ADVERT, _signed_part(run_id, peer_id, maddrs), signature, signer=peer_id,
                     key=remote_key)
    if not verdict.ok:
        raise AdvertRejected("bad_signature", f"signature does not verify under {peer_id}'s key ({verdict.value})")
    return Advert(run_id, peer_id, tuple(maddrs))


def service_fingerprint(run_id: str) -> str:
    """10 hex chars of sha256(run_id): the mDNS service type is `_p2p-<fp>._udp.local.`, so
    browsers of one run do not even see other runs' advertisements (the record's run id is
    still checked: a fingerprint collision or a squatter is rejected as `wrong_run`).
    15 characters is the DNS-SD limit for a service label, hence 10."""
    return hashlib.sha256(run_id.encode()).hexdigest()[:10]
