"""protocol/signing.py: keys, peer ids, contexts, sign and verify; and golden records.

The GOLDEN records were produced by the signing code that lived in strategies/sapo/records.py
and node/discovery_record.py (RSA: a key from `ensure_identity`; Ed25519: seed 0..31), so the
module must reproduce their exact bytes and accept them."""
from __future__ import annotations

import msgpack
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding

from swarm_node.discovery_record import Advert, decode_advert, encode_advert
from swarm_node.identity import ensure_identity
from swarm_node.protocol.signing import (Context, KeyType, PublicKey, Signer, Verdict, encode_key_proto,
                                         key_of_peer_id, peer_id_of, verify)
from swarm_node.strategies.sapo.records import RolloutGroup, decode_rollout, encode_rollout

RUN = "golden-run"
DISCOVERY_PREFIX = b"swarm-node/discovery-advert/v1\x00"  # the advert's domain, as it has always been on the wire

GOLDEN = {
    "rsa": dict(
        key=(
            "080012a709308204a302010002820101009b51201d4763e09b78f67983fab2c7bebf32a99c224bffca311c0c15ccb5fe2042c2f1"
            "2bde83f2b2553e488300a1fd3543dcdf1dceabd00b24d466d695609367ea004ad53b738aec7e9d91f331f800d5271e6d16af5dce"
            "869fcd026e48800eb04459c7db62dcdfa71416db12ac6f08d2093d9f4e2118899cdfc1abc70d36c1cf208441886b3066ec84ac54"
            "bd8db468747360271eddbf8205de29fa05bf635e8d91b6f5e59e5793339167b366fe557ecabee82122b38074a9c0fa2d4949a27d"
            "c94072348a574b5bfda96e4ea63b58abdcb3c7ad0b19ded7a44f60e9966873a01b970f363603912e03d21dd67a741df2ca5338fc"
            "48d1a41b9f8e94cd93c1613ddb020301000102820100114f6b2fb2dcb2a99bee3075e1538547eb96fc68a3e3ea2d6be819d560d1"
            "9471f3aee16287c96c9babe77b526a6d78c333d337e4b7bb80be3536725863cbf5dc7a2bda809b15d2111b3d7988ec1e9d62799a"
            "7e585866dbea8cd5def9a69d407081cb007ccc2f1cc2ca238ffaabfadb60a404ae596ea930467fce5dd445fde929fd6cb1bb2ff4"
            "5c8eaf83fce2343c2eadc2d02ac30a0857f722e2c95bbcc080b0d99dc66ecf12fa5853af6531947b9e8d0e64ddcfc8cb6bac5e09"
            "0fc8e716e430c210b0818ddfce1b2f5e8cd9ba0775179d069a5bb1a36de1c797aa2c0efa2f5e1f215cde413c7cc503410e42d819"
            "09682e5ea8f6d1e9efd660164ee823452a9502818100dac64836b9e917d63eb84b0ff7d66e277cf4fcd569011fe7aad79656ce28"
            "766ee2c4e758ed996d55fb84bdc77021add1c8a55a6f9f2de27fcd329788ed08e0409a4a63ad6ad37be01473aaecd262f293db30"
            "acedca62c2ac6916aaa7029b75704f7103bfb9aee98a7005f873ada2691a2a15941accd062e383862e76f89645c502818100b5be"
            "a860f79587e91f55df93fef0cbc39a1bf872546be113739ef934899553f69fb66b8c3c09ecf2a48a6ce664db1105f784fb3cde69"
            "292c0049e0d09973927585690fdda3fb326d61e33caa8940269c2873b1730e861ae55a9e2efc713b82de98be7b90310e21657e09"
            "41e392f5aa04c090a5b0c87fe4f46d5b18f8da7b4f1f0281810093f1e8ddd16536f07463aea732c3b8a44d9562f172dc06d664aa"
            "fc08e1cb6d23d988aca66faf04c85399d5b8ec346a5666a8a37abe9b8a034121c866195d9a4135d5be8884a855aa184a8c3930a1"
            "274823bf4c02568de8f62ceede22a8d9b65667f296456e6d419393e405bb3c9d8b13dd87d02b3b7c649354db45cac09ae6bd0281"
            "805dbc54c99648380dc34c9e008da791e0737663a04bec4beca56063b576145f76be8eee4f289411f25f6cc997d682a9f802de42"
            "59f57815750d3d0d47692d93672b84b15b25fd23d8087993cb7cf86a3176279d68f31fb5757f54407590cd19c546d04f9861c4a0"
            "f2e09b53b155158137ec3d6e478c51723ba2bf2e550312400f0281807f74705cd60bbfd01f33a6086927df8a6a5910fdf125c9c6"
            "1cde1f7bec8482720b25915c196936dff22b34a0f5b219b46545a27dd6561e0b9e8b8b04909512295ba28bb17ccaecb3f89f8dca"
            "3348f7818bb3dee6ce072868758061b64acd23b790b85d8bf03b2c016f2902d7861cbb6475661703fd9e7d8c2af7c020b4fed0d8"
        ),
        peer_id="QmNQsUaupk1ujMntnXrRLu3xsmyqHTrnjkPY99LjZFjZrX",
        public_key=(
            "080012a60230820122300d06092a864886f70d01010105000382010f003082010a02820101009b51201d4763e09b78f67983fab2"
            "c7bebf32a99c224bffca311c0c15ccb5fe2042c2f12bde83f2b2553e488300a1fd3543dcdf1dceabd00b24d466d695609367ea00"
            "4ad53b738aec7e9d91f331f800d5271e6d16af5dce869fcd026e48800eb04459c7db62dcdfa71416db12ac6f08d2093d9f4e2118"
            "899cdfc1abc70d36c1cf208441886b3066ec84ac54bd8db468747360271eddbf8205de29fa05bf635e8d91b6f5e59e5793339167"
            "b366fe557ecabee82122b38074a9c0fa2d4949a27dc94072348a574b5bfda96e4ea63b58abdcb3c7ad0b19ded7a44f60e9966873"
            "a01b970f363603912e03d21dd67a741df2ca5338fc48d1a41b9f8e94cd93c1613ddb0203010001"
        ),
        rollout=(
            "9401c46799aa676f6c64656e2d72756e07d92e516d4e5173556175706b31756a4d6e746e5872524c753378736d79714854726e6a"
            "6b505939394c6a5a466a5a7258a4616464340311a4312b323d94a133a134a135a13381a56d6f64656cad627974652d6770742d31"
            "783634c5012b080012a60230820122300d06092a864886f70d01010105000382010f003082010a02820101009b51201d4763e09b"
            "78f67983fab2c7bebf32a99c224bffca311c0c15ccb5fe2042c2f12bde83f2b2553e488300a1fd3543dcdf1dceabd00b24d466d6"
            "95609367ea004ad53b738aec7e9d91f331f800d5271e6d16af5dce869fcd026e48800eb04459c7db62dcdfa71416db12ac6f08d2"
            "093d9f4e2118899cdfc1abc70d36c1cf208441886b3066ec84ac54bd8db468747360271eddbf8205de29fa05bf635e8d91b6f5e5"
            "9e5793339167b366fe557ecabee82122b38074a9c0fa2d4949a27dc94072348a574b5bfda96e4ea63b58abdcb3c7ad0b19ded7a4"
            "4f60e9966873a01b970f363603912e03d21dd67a741df2ca5338fc48d1a41b9f8e94cd93c1613ddb0203010001c5010020de5825"
            "be0a943b37722de5e787607fe5a0728d4dd3659727c53b66e654f78c87fd82d5736648dbbe9e76c73beda48de1e85b9063b6378c"
            "4d107b0dc18f1af1911c81aeed4df3496ce273e66881c87c453b8ab945c2e9123e90ae5a14c38734b73511c07d94e5eeedb74bef"
            "8e46ab3705159c182bbc68ba5062be22817a351de3719bb04d7c5c611afb6d3d985749ab3fa9312c624dbe7f0c939cb59f7313c5"
            "c7e8a5cba8335f0d1683e7e3d52bf35a132b6fb41fc509cd17587a72da927d974aa6d1b91590b52a12c91421cc634b6d0bedc5b8"
            "2074328d9f7186b1d709c0509551a677a3b8ba325b565fc60a1eaaf98766ea47fcbb6130620e33731785d635"
        ),
        group_id="79d6bfcb3ab0df5466964e8b4f3729ce",
        advert=(
            "9501aa676f6c64656e2d72756ed92e516d4e5173556175706b31756a4d6e746e5872524c753378736d79714854726e6a6b505939"
            "394c6a5a466a5a725891d94a2f6970342f31302e302e302e352f7463702f33313333372f7032702f516d4e5173556175706b3175"
            "6a4d6e746e5872524c753378736d79714854726e6a6b505939394c6a5a466a5a7258c50100569b2261217979773ac9d7feee87db"
            "6d8e336089091e09a3fb7a3425ee64a8cadf9c6fcc59f09cac9f4cc05868e7c2ce733b4f78d72ae83bffb34875d4d1df2a6a2297"
            "0fe047d264f958649ba3d96e3feb1006936b9bedc8ba0654bbadbb542a00a4acc5f31d220f67a82dcde7e293819a5eafba21f161"
            "593782cba699da4708a711903da88545bbd0ed324f2ffb66e0ae009354a1970efaf9fb12294f9681a6f179acb239110bd6a4c0a0"
            "909c7bf75802598b86379041439326e4513b016e9b0126719aa576e4619bd381f6587a23dc5138a1f504c7a68119629c36f1eaea"
            "e8d9123658b938af209a095922d670924dba5db90f093b40e7969f64515aea9b7c"
        ),
    ),
    "ed25519": dict(
        key=(
            "08011240000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f03a107bff3ce10be1d70dd18e74bc099"
            "67e4d6309ba50d5f1ddc8664125531b8"
        ),
        peer_id="12D3KooWA4Xop1JaT3MHxwYMkCepYsv4iPVopMXwCz5iHYdBfeSB",
        public_key="0801122003a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8",
        rollout=(
            "9401c46d99aa676f6c64656e2d72756e07d934313244334b6f6f574134586f70314a6154334d487877594d6b4365705973763469"
            "50566f704d5877437a35694859644266655342a4616464340311a4312b323d94a133a134a135a13381a56d6f64656cad62797465"
            "2d6770742d31783634c4240801122003a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8c4408dcfe8"
            "ebfd085c0f09c1c1ec235e7141e1e4cf5349beb2be5e2e905284c8a0e1971dfae15ec017e1532ec8668b71a6bc9deea69ca08d75"
            "2a3e6ff669da89e705"
        ),
        group_id="2ae71d82d63ebeb2ab59353513b67fbd",
        advert=(
            "9501aa676f6c64656e2d72756ed934313244334b6f6f574134586f70314a6154334d487877594d6b436570597376346950566f70"
            "4d5877437a3569485964426665534291d9502f6970342f31302e302e302e352f7463702f33313333372f7032702f313244334b6f"
            "6f574134586f70314a6154334d487877594d6b436570597376346950566f704d5877437a35694859644266655342c440a34a2499"
            "1da775307b4608bc92ec04b0414e20283160c326a29bfd679cd34b6e0caf1085bd5e3f10737354499b12b667193382230d48bb0d"
            "1a9e447f7236fe0e"
        ),
    ),
}


def _signer(kind: str) -> Signer:
    return Signer.from_private_key_proto(bytes.fromhex(GOLDEN[kind]["key"]))


def _group(signer: Signer) -> RolloutGroup:
    return RolloutGroup(RUN, 7, signer.peer_id, "add4", 3, 17, "1+2=", ("3", "4", "5", "3"), {"model": "byte-gpt-1x64"})


def _advert(signer: Signer) -> Advert:
    return Advert(RUN, signer.peer_id, (f"/ip4/10.0.0.5/tcp/31337/p2p/{signer.peer_id}",))


KINDS = ("rsa", "ed25519")


# ---- sign and verify --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_per_key_kind(kind: str):
    s = _signer(kind)
    assert s.public_key.key_type is {"rsa": KeyType.RSA, "ed25519": KeyType.ED25519}[kind]
    assert s.peer_id == GOLDEN[kind]["peer_id"] == s.public_key.peer_id
    sig = s.sign(Context.DISCOVERY_ADVERT, b"payload")
    assert verify(Context.DISCOVERY_ADVERT, b"payload", sig, signer=s.peer_id, key=s.public_key) is Verdict.VALID
    assert verify(Context.DISCOVERY_ADVERT, b"payload", sig, signer=s.peer_id, key=s.public_key.proto).ok
    # without a key: an Ed25519 id carries its key, an RSA (Qm) id is only its hash
    expected = Verdict.VALID if kind == "ed25519" else Verdict.NO_KEY
    assert verify(Context.DISCOVERY_ADVERT, b"payload", sig, signer=s.peer_id) is expected


@pytest.mark.parametrize("kind", KINDS)
def test_flipped_byte_wrong_signer_and_other_context_are_rejected(kind: str):
    s, other = _signer(kind), _signer("ed25519" if kind == "rsa" else "rsa")
    payload = b"\x93\x01\xa3abc"
    sig = s.sign(Context.SAPO_ROLLOUT, payload)

    def check(p: bytes, g: bytes, **kw) -> Verdict:
        return verify(Context.SAPO_ROLLOUT, p, g, **{"signer": s.peer_id, "key": s.public_key, **kw})

    assert check(payload, sig) is Verdict.VALID
    for i in (0, len(payload) - 1):
        assert check(payload[:i] + bytes([payload[i] ^ 1]) + payload[i + 1:], sig) is Verdict.BAD_SIGNATURE
    for i in (0, len(sig) // 2, len(sig) - 1):
        assert check(payload, sig[:i] + bytes([sig[i] ^ 1]) + sig[i + 1:]) is Verdict.BAD_SIGNATURE
    # another peer's signature: under its own key it is not s's; under s's key it does not verify
    theirs = other.sign(Context.SAPO_ROLLOUT, payload)
    assert check(payload, theirs, key=other.public_key) is Verdict.WRONG_SIGNER
    assert check(payload, theirs) is Verdict.BAD_SIGNATURE
    assert check(payload, sig, signer=other.peer_id) is Verdict.WRONG_SIGNER
    # a signature made for another context
    assert check(payload, s.sign(Context.DISCOVERY_ADVERT, payload)) is Verdict.BAD_SIGNATURE
    assert verify(Context.DISCOVERY_ADVERT, payload, sig, signer=s.peer_id, key=s.public_key) is Verdict.BAD_SIGNATURE


def test_hostile_inputs_are_verdicts_not_exceptions():
    s = _signer("ed25519")
    sig = s.sign(Context.SAPO_ROLLOUT, b"x")
    secp = encode_key_proto(2, b"\x02" + b"\x11" * 32)  # a Secp256k1 key: a libp2p type we do not verify
    rsa_typed_garbage = encode_key_proto(KeyType.RSA, b"\x30\x03\x02\x01\x01" * 20)
    assert verify(Context.SAPO_ROLLOUT, b"x", sig, signer=peer_id_of(secp), key=secp) is Verdict.BAD_KEY
    assert verify(Context.SAPO_ROLLOUT, b"x", sig, signer=peer_id_of(rsa_typed_garbage),
                  key=rsa_typed_garbage) is Verdict.BAD_KEY
    assert verify(Context.SAPO_ROLLOUT, b"x", sig, signer=peer_id_of(b"junk"), key=b"junk") is Verdict.BAD_KEY
    wrong_type: object = "sig"
    assert verify(Context.SAPO_ROLLOUT, b"x", wrong_type,  # type: ignore[arg-type]
                  signer=s.peer_id, key=s.public_key) is Verdict.BAD_SIGNATURE
    assert verify(Context.SAPO_ROLLOUT, b"x", b"", signer=s.peer_id, key=s.public_key) is Verdict.BAD_SIGNATURE
    assert verify(Context.SAPO_ROLLOUT, b"x", sig, signer=s.peer_id, key=7) is Verdict.WRONG_SIGNER  # type: ignore
    assert verify(Context.SAPO_ROLLOUT, b"x", sig, signer="not-a-peer-id") is Verdict.NO_KEY


def test_the_peer_id_is_of_the_key_bytes_as_received():
    """1. Re-encode an Ed25519 key with a padded (non-minimal) varint type.
    2. Verify a real signature under it, claiming the canonical peer id.
    Result: WRONG_SIGNER; the id is the hash of the bytes a peer sent, never of a re-encoding."""
    s = _signer("ed25519")
    padded = b"\x08\x81\x00\x12\x20" + s.public_key.data
    assert PublicKey.from_proto(padded).data == s.public_key.data
    sig = s.sign(Context.SAPO_ROLLOUT, b"x")
    assert verify(Context.SAPO_ROLLOUT, b"x", sig, signer=s.peer_id, key=padded) is Verdict.WRONG_SIGNER


def test_peer_id_maps_to_key():
    ed, rsa_ = _signer("ed25519"), _signer("rsa")
    assert ed.peer_id.startswith("12D3KooW") and rsa_.peer_id.startswith("Qm")
    assert key_of_peer_id(ed.peer_id) == ed.public_key
    assert key_of_peer_id(rsa_.peer_id) is None and key_of_peer_id("0OIl") is None and key_of_peer_id("") is None
    with pytest.raises(ValueError, match="unsupported key type"):
        Signer.from_private_key_proto(encode_key_proto(2, b"\x01" * 32))


def test_contexts_are_unambiguous():
    prefixes = [c.value for c in Context if c.value]
    assert Context.DISCOVERY_ADVERT.value == DISCOVERY_PREFIX
    assert len(set(c.value for c in Context)) == len(Context)
    assert not any(a != b and b.startswith(a) for a in prefixes for b in prefixes)
    # the unprefixed context signs msgpack arrays, whose first byte no prefix starts with
    body = _group(_signer("ed25519")).body()
    assert 0x90 <= body[0] <= 0x9F and all(0x20 <= p[0] < 0x7F for p in prefixes)


# ---- golden bytes: the records signed before this module existed -------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_new_signatures_equal_the_golden_records(kind: str):
    g, s = GOLDEN[kind], _signer(kind)
    assert s.public_key.proto.hex() == g["public_key"]
    sr = encode_rollout(_group(s), s)
    assert sr.wire.hex() == g["rollout"] and sr.group_id == g["group_id"]
    assert encode_advert(_advert(s), s).hex() == g["advert"]


@pytest.mark.parametrize("kind", KINDS)
def test_golden_records_still_verify(kind: str):
    g = GOLDEN[kind]
    got = decode_rollout(bytes.fromhex(g["rollout"]), run_id=RUN, group_size=4, current_round=7, from_peer=g["peer_id"])
    assert got.group.sender == g["peer_id"] and got.group_id == g["group_id"]
    ad = decode_advert(bytes.fromhex(g["advert"]), expected_run_id=RUN, remote_peer_id=g["peer_id"],
                       remote_key=bytes.fromhex(g["public_key"]))
    assert ad.peer_id == g["peer_id"]


@pytest.mark.parametrize("kind", KINDS)
def test_new_signatures_verify_with_plain_libp2p_rules(kind: str):
    """The former verification, written out with `cryptography` alone: the advert's signature
    covers the domain prefix plus the payload, the rollout's the bare body."""
    s = _signer(kind)
    key_type, data = s.public_key.key_type, s.public_key.data
    for prefix, context in ((DISCOVERY_PREFIX, Context.DISCOVERY_ADVERT), (b"", Context.SAPO_ROLLOUT)):
        sig = s.sign(context, b"payload")
        if key_type is KeyType.RSA:
            pub = serialization.load_der_public_key(data)
            pub.verify(sig, prefix + b"payload", padding.PKCS1v15(), hashes.SHA256())  # type: ignore[union-attr]
        else:
            ed25519.Ed25519PublicKey.from_public_bytes(data).verify(sig, prefix + b"payload")
    outer = msgpack.unpackb(bytes.fromhex(GOLDEN[kind]["rollout"]))
    assert peer_id_of(outer[2]) == s.peer_id


def test_identity_peer_id_matches_hivemind(tmp_path):
    """The node's identity (hivemind's RSA key file) gets the peer id hivemind gives it."""
    from hivemind.p2p import PeerID

    ident = ensure_identity(tmp_path / "identity.key")
    assert ident.peer_id == PeerID.from_identity(ident.path.read_bytes()).to_base58()
    assert Signer.from_identity_file(ident.path).peer_id == ident.peer_id
