"""Signatures: the node's identity key, signing with it, and checking other peers' signatures.

Owns the key types (libp2p `crypto.pb` keys: RSA, which every node identity.key is, and
Ed25519), how a public key maps to a peer id, and the signing contexts. Invariants:
- a signature covers `context prefix + payload`; each signed record type has its own `Context`,
  and no context's signed bytes can be read as another's (see `Context`);
- a signature counts for a claimed peer id only if the key that verified it hashes (RSA, `Qm...`)
  or inlines (Ed25519, `12D3KooW...`) to that id, computed over the key bytes as received;
  `verify` always checks both;
- RSA is PKCS#1 v1.5 over SHA-256 and Ed25519 is plain, as libp2p signs, so a signature made
  here verifies in py-libp2p and go-libp2p and the other way round.
`verify` never raises on hostile input: it returns a `Verdict`. Pure (cryptography, base58):
no hivemind, no py-libp2p, so both the node process and its py-libp2p sidecars import it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from functools import partial
from pathlib import Path
from typing import Callable

import base58
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

MAX_INLINE_KEY_BYTES = 42  # libp2p inlines a serialized public key of at most this size in the peer id


class KeyType(IntEnum):
    """libp2p `crypto.pb` KeyType values of the keys we sign and verify with."""

    RSA = 0
    ED25519 = 1


IDENTITY_KEY_TYPE = KeyType.RSA  # hivemind writes and reads node identities as RSA keys only


class Context(Enum):
    """What a signature is for; the value is the prefix signed in front of the payload.

    SAPO_ROLLOUT signs the bare body (rollout wire v1). That stays unambiguous next to the
    prefixed contexts because a rollout body is a msgpack array (first byte 0x90-0x9f, 0xdc or
    0xdd) and every non-empty prefix starts with a printable ASCII byte."""

    DISCOVERY_ADVERT = b"swarm-node/discovery-advert/v1\x00"
    DHT_RECORD = b"swarm-node/dht-record/v1\x00"
    SAPO_ROLLOUT = b""


class Verdict(Enum):
    """The outcome of `verify`; only VALID means the claimed peer signed the payload."""

    VALID = "valid"
    NO_KEY = "no_key"  # a hashed (RSA) peer id and no key given to check it with
    BAD_KEY = "bad_key"  # not a libp2p public key of a type in KeyType
    WRONG_SIGNER = "wrong_signer"  # the key is not the claimed peer's
    BAD_SIGNATURE = "bad_signature"

    @property
    def ok(self) -> bool:
        return self is Verdict.VALID


# ---- libp2p key protobufs and peer ids -------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(buf) and shift < 64:
        b = buf[pos]
        value |= (b & 0x7F) << shift
        pos += 1
        if not b & 0x80:
            return value, pos
        shift += 7
    raise ValueError("truncated varint")


def encode_key_proto(key_type: int, data: bytes) -> bytes:
    """libp2p crypto.pb {PublicKey,PrivateKey}: field 1 KeyType (varint), field 2 Data (bytes)."""
    return b"\x08" + _varint(key_type) + b"\x12" + _varint(len(data)) + data


def decode_key_proto(blob: bytes) -> tuple[int, bytes]:
    """Inverse of `encode_key_proto` (only the two fields libp2p defines; anything else is an error)."""
    key_type, data, pos = None, None, 0
    while pos < len(blob):
        tag, pos = _read_varint(blob, pos)
        if tag == 0x08:
            key_type, pos = _read_varint(blob, pos)
        elif tag == 0x12:
            n, pos = _read_varint(blob, pos)
            if pos + n > len(blob):
                raise ValueError("truncated key data")
            data, pos = blob[pos:pos + n], pos + n
        else:
            raise ValueError(f"unexpected field tag {tag} in a key protobuf")
    if key_type is None or data is None:
        raise ValueError("key protobuf lacks its type or data")
    return key_type, data


def peer_id_of(public_key_proto: bytes) -> str:
    """The libp2p peer id of a serialized public key: identity multihash when the key is at
    most 42 bytes (Ed25519), else sha2-256 multihash (RSA: the `Qm...` ids hivemind uses)."""
    if len(public_key_proto) <= MAX_INLINE_KEY_BYTES:
        mh = b"\x00" + _varint(len(public_key_proto)) + public_key_proto
    else:
        mh = b"\x12\x20" + hashlib.sha256(public_key_proto).digest()
    return base58.b58encode(mh).decode()


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A peer's public key. `proto` is kept exactly as received: the peer id is its hash, and
    re-encoding a non-canonical protobuf would change which id the key answers to."""

    key_type: KeyType
    data: bytes  # RSA: DER SubjectPublicKeyInfo; Ed25519: the raw 32 bytes
    proto: bytes  # libp2p PublicKey protobuf

    @classmethod
    def from_proto(cls, blob: bytes) -> PublicKey:
        """Raises ValueError unless `blob` is a libp2p public key of a type in KeyType."""
        key_type, data = decode_key_proto(blob)
        try:
            return cls(KeyType(key_type), data, bytes(blob))
        except ValueError:
            raise ValueError(f"unsupported key type {key_type} (RSA and Ed25519 are)") from None

    @classmethod
    def of(cls, key_type: KeyType, data: bytes) -> PublicKey:
        return cls(key_type, data, encode_key_proto(key_type, data))

    @property
    def peer_id(self) -> str:
        return peer_id_of(self.proto)

    def _check(self, signed: bytes, signature: bytes) -> None:
        """Raise InvalidSignature (or ValueError for a malformed key) unless `signature` is valid."""
        if self.key_type is KeyType.RSA:
            pub = serialization.load_der_public_key(self.data)
            if not isinstance(pub, rsa.RSAPublicKey):
                raise ValueError("RSA key type but not an RSA key")
            pub.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
        else:
            ed25519.Ed25519PublicKey.from_public_bytes(self.data).verify(signature, signed)


def key_of_peer_id(peer_id: str) -> PublicKey | None:
    """The public key inlined in an identity-multihash peer id (Ed25519), or None when the id
    is a hash of its key (RSA) or not a peer id at all; a hashed id needs the key from elsewhere."""
    try:
        mh = base58.b58decode(peer_id)
        if mh[:1] != b"\x00":
            return None
        n, pos = _read_varint(mh, 1)
        return PublicKey.from_proto(mh[pos:]) if n == len(mh) - pos else None
    except ValueError:
        return None


# ---- signing and verifying -------------------------------------------------------------------
def _rsa_sign(priv: rsa.RSAPrivateKey, msg: bytes) -> bytes:
    return priv.sign(msg, padding.PKCS1v15(), hashes.SHA256())


@dataclass(frozen=True)
class Signer:
    """This node's signing identity: signs with the private key of its identity.key."""

    peer_id: str
    public_key: PublicKey
    _sign_raw: Callable[[bytes], bytes] = field(repr=False)

    @classmethod
    def from_private_key_proto(cls, blob: bytes) -> Signer:
        """From a libp2p PrivateKey protobuf; raises ValueError for other key types or bad data."""
        key_type, data = decode_key_proto(blob)
        if key_type == KeyType.RSA:
            priv = serialization.load_der_private_key(data, password=None)
            if not isinstance(priv, rsa.RSAPrivateKey):
                raise ValueError("RSA key type but not an RSA key")
            pub = PublicKey.of(KeyType.RSA, priv.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
            return cls(pub.peer_id, pub, partial(_rsa_sign, priv))
        if key_type == KeyType.ED25519:
            # go-libp2p stores seed + public key (64 bytes), py-libp2p the seed alone: the seed is first in both
            priv_ed = ed25519.Ed25519PrivateKey.from_private_bytes(data[:32])
            pub = PublicKey.of(KeyType.ED25519, priv_ed.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw))
            return cls(pub.peer_id, pub, priv_ed.sign)
        raise ValueError(f"unsupported key type {key_type} (RSA and Ed25519 are)")

    @classmethod
    def from_identity_file(cls, path: Path) -> Signer:
        try:
            return cls.from_private_key_proto(Path(path).read_bytes())
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def sign(self, context: Context, payload: bytes) -> bytes:
        return self._sign_raw(context.value + payload)


def verify(context: Context, payload: bytes, signature: bytes, *, signer: str,
           key: PublicKey | bytes | None = None) -> Verdict:
    """Did peer `signer` sign `payload` in `context`? `key` is the signer's public key (a
    PublicKey or its protobuf as received); without one, only an Ed25519 id that inlines its
    key can be checked. The key must map to `signer` before its signature counts."""
    if key is None:
        key = key_of_peer_id(signer)
        if key is None:
            return Verdict.NO_KEY
    proto = key.proto if isinstance(key, PublicKey) else key
    if type(proto) is not bytes or peer_id_of(proto) != signer:
        return Verdict.WRONG_SIGNER
    try:
        parsed = key if isinstance(key, PublicKey) else PublicKey.from_proto(proto)
    except ValueError:
        return Verdict.BAD_KEY
    if type(payload) is not bytes or type(signature) is not bytes:
        return Verdict.BAD_SIGNATURE
    try:
        parsed._check(context.value + payload, signature)
    except InvalidSignature:
        return Verdict.BAD_SIGNATURE
    except (ValueError, TypeError, UnsupportedAlgorithm):  # key bytes that parse as a protobuf but not as a key
        return Verdict.BAD_KEY
    return Verdict.VALID
