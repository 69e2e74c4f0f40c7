"""The node's connection to the swarm: one p2pd, one in-process Kademlia DHT node, on our loop.

Why not `hivemind.DHT`: it forks a process, talks to it over a pipe that breaks on values
of ~16 KB under uvloop, and leaves orphans on SIGKILL. `DHTNode.create(p2p=...)` runs in
this loop instead (about 3x faster, no pipe).

Joining: p2pd refuses to start when none of its bootstrap peers answers, so it starts alone and
`connect_peers` dials the initial peers (dial, a DHT ping that puts both sides in each other's
routing table, then a lookup of our own id). An unreachable initial peer is a warning and a retry.
Isolation: hivemind pings initial peers only at creation, so a table emptied by a partition
stays empty; `IsolationWatchdog` re-runs `connect_peers` on the initial and last-known peers
until it is refilled.

Every DHT record is signed by its writer and checked on store and read (protocol/dht_signing.py).
All awaits on the network carry deadlines; DHT request metrics are updated here (/metrics).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, PeerID
from hivemind.utils import get_dht_time
from multiaddr import Multiaddr

from swarm_node.metrics import NodeMetrics
from swarm_node.protocol.dht_signing import SignedRecordValidator
from swarm_node.protocol.signing import Signer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NetworkSettings:
    host: str
    port: int
    announce_host: str | None
    identity_path: Path
    startup_timeout_s: float
    dht_wait_timeout_s: float = 3.0
    connect_timeout_s: float = 5.0


def split_peer_maddr(maddr: str) -> tuple[PeerID, Multiaddr]:
    """'/ip4/1.2.3.4/tcp/5/p2p/Qm..' -> (PeerID, '/ip4/1.2.3.4/tcp/5'); ValueError if malformed."""
    try:
        full = Multiaddr(maddr)
        peer_id = PeerID.from_base58(full["p2p"])
        transport = full.decapsulate(Multiaddr(f"/p2p/{full['p2p']}"))
    except Exception as e:
        raise ValueError(f"bad peer multiaddr {maddr!r}: {e}") from None
    return peer_id, transport


def peer_ids_of(maddrs: Iterable[str]) -> set[str]:
    """The peer ids named in `/p2p/...` multiaddrs (malformed ones skipped: the join warns of them)."""
    ids = set()
    for m in maddrs:
        try:
            ids.add(split_peer_maddr(m)[0].to_base58())
        except ValueError:
            continue
    return ids


def choose_join_maddrs(visible: Iterable[Multiaddr], peer_id: PeerID) -> list[str]:
    """Addresses other machines can dial: routable ones first; loopback only if nothing else."""
    tcp = [m for m in visible if "/tcp/" in str(m)]
    routable = [m for m in tcp if not str(m).startswith(("/ip4/127.", "/ip6/::1"))]
    chosen = routable or tcp
    suffix = f"/p2p/{peer_id.to_base58()}"
    return [str(m) if str(m).endswith(suffix) else f"{m}{suffix}" for m in chosen]


class SwarmNetwork:
    """p2pd + DHTNode, with bounded DHT calls that feed the node's metrics."""

    def __init__(self, p2p: P2P, dht: DHTNode, metrics: NodeMetrics, settings: NetworkSettings):
        self.p2p, self.dht, self.metrics, self.settings = p2p, dht, metrics, settings
        self.peer_id: PeerID = p2p.peer_id

    @classmethod
    async def create(cls, settings: NetworkSettings, metrics: NodeMetrics) -> "SwarmNetwork":
        host_maddrs = [f"/ip4/{settings.host}/tcp/{settings.port}"]
        announce = None
        if settings.announce_host:
            if settings.port == 0:
                raise ValueError("--announce-host needs an explicit --port (port 0 cannot be announced)")
            announce = [f"/ip4/{settings.announce_host}/tcp/{settings.port}"]
        p2p = await P2P.create(
            host_maddrs=host_maddrs,
            announce_maddrs=announce,
            identity_path=str(settings.identity_path),
            startup_timeout=settings.startup_timeout_s,
            # The identity check spawns a second p2pd and is behind most "failed to start"
            # reports; a lock file on the state dir prevents local reuse of one identity.
            check_if_identity_free=False,
        )
        try:
            signer = Signer.from_identity_file(settings.identity_path)
            if signer.peer_id != p2p.peer_id.to_base58():
                raise RuntimeError(f"{settings.identity_path} is not the key p2pd runs with")
            validator = SignedRecordValidator(
                signer, on_forged=lambda: metrics.rejected_messages.labels(reason="forged_record").inc())
            dht = await DHTNode.create(p2p=p2p, wait_timeout=settings.dht_wait_timeout_s, record_validator=validator,
                                       cache_locally=True, cache_nearest=1, blacklist_time=1.0)
        except BaseException:
            await p2p.shutdown()
            raise
        return cls(p2p, dht, metrics, settings)

    # ---- addresses -------------------------------------------------------------------
    async def join_maddrs(self) -> list[str]:
        visible = await asyncio.wait_for(self.p2p.get_visible_maddrs(latest=True), 10)
        return choose_join_maddrs(visible, self.peer_id)

    def routing_table_size(self) -> int:
        return len(self.dht.protocol.routing_table.uid_to_peer_id)

    # ---- joining ---------------------------------------------------------------------
    async def connect_peers(self, maddrs: Iterable[str]) -> int:
        """Dial and DHT-ping each peer; then look ourselves up. Returns how many answered."""
        maddrs = list(dict.fromkeys(maddrs))
        if not maddrs:
            return 0
        results = await asyncio.gather(*(self._connect_one(m) for m in maddrs))
        answered = sum(results)
        if answered:
            try:
                await asyncio.wait_for(self.dht.find_nearest_nodes([self.dht.node_id]),
                                       self.settings.connect_timeout_s)
            except asyncio.TimeoutError:
                log.warning("routing-table refresh after join timed out")
        return answered

    async def _connect_one(self, maddr: str) -> bool:
        try:
            peer_id, transport = split_peer_maddr(maddr)
        except ValueError as e:
            log.warning("%s", e)
            return False
        if peer_id == self.peer_id:
            return False
        try:
            await asyncio.wait_for(self.p2p._client.connect(peer_id, [transport]), self.settings.connect_timeout_s)
            node_id = await asyncio.wait_for(self.dht.protocol.call_ping(peer_id),
                                             self.settings.connect_timeout_s)
        except Exception as e:  # p2pd errors come in several types; all mean "not now"
            log.info("peer %s not reachable: %s", maddr, _short(e))
            return False
        if node_id is None:
            log.info("peer %s did not answer a DHT ping", maddr)
            return False
        return True

    # ---- bounded DHT access ----------------------------------------------------------
    async def store(self, key: str, value: bytes, ttl_s: float, subkey: str | None = None) -> bool:
        return await self._timed("store", self.dht.store(key, value, get_dht_time() + ttl_s, subkey=subkey),
                                 len(key) + len(value))

    async def get(self, key: str) -> Any:
        return await self._timed("get", self.dht.get(key, latest=True), len(key))

    async def _timed(self, op: str, coro, tx_bytes: int) -> Any:
        start = time.perf_counter()
        outcome = "ok"
        try:
            return await asyncio.wait_for(coro, self.settings.dht_wait_timeout_s * 2 + 1)
        except asyncio.TimeoutError:
            outcome = "timeout"
            return None if op == "get" else False
        except Exception as e:
            outcome = "error"
            log.warning("DHT %s failed: %s", op, _short(e))
            return None if op == "get" else False
        finally:
            self.metrics.dht_requests.labels(op=op, outcome=outcome).inc()
            self.metrics.dht_request_duration.labels(op=op).observe(time.perf_counter() - start)
            self.metrics.net_tx_bytes.labels(channel="dht").inc(tx_bytes)

    async def shutdown(self) -> None:
        try:
            await asyncio.wait_for(self.dht.shutdown(), 5)
        except Exception as e:
            log.debug("DHT shutdown: %s", _short(e))
        try:
            await asyncio.wait_for(self.p2p.shutdown(), 5)
        except Exception as e:
            log.debug("p2pd shutdown: %s", _short(e))


class IsolationWatchdog:
    """Re-bootstraps when the routing table is empty although we know other peers.

    `known_peers` returns maddrs of peers seen recently (from membership records); the
    initial peers are always tried too. Runs forever with a fixed period; each attempt is
    counted in `swarm_bootstrap_attempts_total{outcome}`.
    """

    def __init__(self, net: SwarmNetwork, initial_peers: list[str], known_peers: Callable[[], list[str]],
                 interval_s: float, enabled: bool = True):
        self.net, self.initial_peers, self.known_peers = net, initial_peers, known_peers
        self.interval_s, self.enabled = interval_s, enabled
        self.isolated = False
        self.ever_connected = False
        self.last_attempt_ok: bool | None = None

    def candidates(self) -> list[str]:
        return list(dict.fromkeys([*self.initial_peers, *self.known_peers()]))

    async def attempt(self) -> bool:
        answered = await self.net.connect_peers(self.candidates())
        ok = answered > 0
        self.net.metrics.bootstrap_attempts.labels(outcome="ok" if ok else "failed").inc()
        self.last_attempt_ok = ok
        if ok:
            self.ever_connected = True
        return ok

    async def check_once(self) -> None:
        size = self.net.routing_table_size()
        self.net.metrics.routing_table_peers.set(size)
        if size > 0:
            self.ever_connected = True
            if self.isolated:
                log.info("routing table refilled (%d peers): no longer isolated", size)
            self.isolated = False
            return
        if not self.candidates():
            return  # first node of a new swarm with nobody to call: alone, not isolated
        if not self.isolated:
            log.warning("no peers in the routing table: isolated, reconnecting to %d known peers",
                        len(self.candidates()))
        self.isolated = True
        if self.enabled and await self.attempt():
            self.isolated = self.net.routing_table_size() == 0
            if not self.isolated:
                self.net.metrics.recoveries.labels(kind="rebootstrap", outcome="ok").inc()
                log.info("re-joined the swarm (%d peers in routing table)", self.net.routing_table_size())

    async def run(self) -> None:
        while True:
            try:
                await self.check_once()
            except Exception:
                log.exception("watchdog check failed")
            await asyncio.sleep(self.interval_s)


def _short(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text.splitlines()[0][:200]
