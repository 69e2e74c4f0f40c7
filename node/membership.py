"""Membership: publish our heartbeat record, read everyone else's, agree on the run spec.

Contract:
- `announce()` stores our `PeerRecord` under `swarm/{run}/peers` (subkey = our peer id)
  with expiry now + ttl. `refresh()` reads that key with `latest=True` — the read is also
  the active probe that lets the DHT notice dead neighbours (a quiet routing table never
  shrinks, so isolation would go unseen).
- The view contains only well-formed records of peers running our spec hash; every other
  record is dropped and counted under `swarm_rejected_messages_total{reason}`
  (`bad_record` for malformed/spoofed, `spec_mismatch` for a different run spec).
- A LEAVING record removes the peer at once, and `left_since()` counts it as a graceful
  leave (the run-long quorum does not wait for it); otherwise a peer leaves the view when
  its record expires (ttl = 2.5 x announce interval by default).
- `check_spec()` raises `SpecMismatch` naming each differing field when the DHT already
  holds a different spec for this run id.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from hivemind.utils import get_dht_time

from swarm_node.protocol.records import PeerRecord, RecordError, SpecRecord, peers_key, spec_key
from swarm_node.config import RunSpec
from swarm_node.metrics import NodeMetrics
from swarm_node.network import SwarmNetwork

log = logging.getLogger(__name__)


class SpecMismatch(Exception):
    """This node's run spec differs from the one the swarm already trains."""


@dataclass(frozen=True)
class Member:
    record: PeerRecord
    expires_at: float  # DHT time

    @property
    def peer_id(self) -> str:
        return self.record.peer_id


class Membership:
    def __init__(self, net: SwarmNetwork, spec: RunSpec, metrics: NodeMetrics, ttl_s: float,
                 make_record: Callable[[str], PeerRecord]):
        self.net, self.spec, self.metrics, self.ttl_s = net, spec, metrics, ttl_s
        self.make_record = make_record  # state -> our current record
        self.spec_hash = spec.digest()
        self.self_id = net.peer_id.to_base58()
        self._view: dict[str, Member] = {}
        self._rejected_logged: set[tuple[str, str]] = set()
        self.last_refresh_ok: float | None = None
        # peer -> (DHT time, strategy) of its LEAVING record, seen while the peer was in the view
        self._left: dict[str, tuple[float, str]] = {}
        self._spec_due = 0.0  # monotonic time our spec record must be republished by

    # ---- the run spec ----------------------------------------------------------------
    async def check_spec(self, trusted: set[str]) -> None:
        """Compare our spec with the one the `trusted` peers (those we join through) publish.

        Specs are records like any other: each peer's under its own id, signed. Only a trusted
        peer's spec binds us, so a stranger who publishes another spec under this run id cannot
        turn honest joiners away; a differing spec of anyone else is counted and ignored."""
        found = await self.net.get(spec_key(self.spec.run_id))
        entries = found.value if found is not None and isinstance(found.value, dict) else {}
        for subkey, item in entries.items():
            if subkey == self.self_id:
                continue
            try:
                theirs = SpecRecord.from_wire(item.value)
            except RecordError as e:
                self._reject("bad_record", str(subkey), f"malformed spec record: {e}")
                continue
            if theirs.digest == self.spec_hash:
                continue
            if subkey not in trusted:
                self._reject("spec_mismatch", str(subkey), "publishes another spec for this run id (ignored: "
                             "not a peer we join through)")
                continue
            diffs = self.spec.differences(theirs.spec) or ["(same fields, different hash)"]
            raise SpecMismatch(
                f"run '{self.spec.run_id}' already trains with a different spec; differing fields:\n  "
                + "\n  ".join(diffs)
                + "\nUse the same settings as the swarm, or a different --run-id.")
        await self.publish_spec()

    async def publish_spec(self) -> None:
        rec = SpecRecord(digest=self.spec_hash, spec=self.spec.canonical())
        ttl_s = max(self.ttl_s * 4, 60)
        if await self.net.store(spec_key(self.spec.run_id), rec.to_wire(), ttl_s=ttl_s, subkey=self.self_id):
            self._spec_due = time.monotonic() + ttl_s / 2  # a joiner that names us must always find it

    # ---- heartbeats ------------------------------------------------------------------
    async def announce(self, state: str = "online", ttl_s: float | None = None) -> bool:
        if state == "online" and time.monotonic() >= self._spec_due:
            await self.publish_spec()
        rec = self.make_record(state)
        return await self.net.store(peers_key(self.spec.run_id), rec.to_wire(),
                                    ttl_s=ttl_s if ttl_s is not None else self.ttl_s, subkey=self.self_id)

    async def refresh(self) -> None:
        found = await self.net.get(peers_key(self.spec.run_id))
        now = get_dht_time()
        if found is None:
            # A failed read (a timeout toward an unreachable replica of the key, say) is no news:
            # every record stays valid until its own expiry. Emptying the view here made the
            # reachable side of a partition believe it had lost its peers too.
            self._update({pid: m for pid, m in self._view.items() if m.expires_at > now})
            return
        entries = found.value if isinstance(found.value, dict) else {}
        self.last_refresh_ok = time.time()
        view: dict[str, Member] = {}
        for subkey, item in entries.items():
            member = self._parse(subkey, item, now)
            if member is not None:
                view[member.peer_id] = member
        self._update(view)

    def _parse(self, subkey, item, now: float) -> Member | None:
        try:
            rec = PeerRecord.from_wire(item.value, subkey=subkey if isinstance(subkey, str) else repr(subkey))
        except RecordError as e:
            self._reject("bad_record", str(subkey), str(e))
            return None
        if rec.spec_hash != self.spec_hash:
            self._reject("spec_mismatch", rec.peer_id, f"runs spec {rec.spec_hash}, ours is {self.spec_hash}")
            return None
        if rec.state == "leaving":
            if rec.peer_id in self._view and rec.peer_id != self.self_id:
                self._left[rec.peer_id] = (now, rec.strategy)
                if len(self._left) > 1024:  # bounded: the oldest leaves no longer matter
                    del self._left[min(self._left, key=lambda p: self._left[p][0])]
            return None
        if item.expiration_time <= now:
            return None
        return Member(rec, item.expiration_time)

    def _reject(self, reason: str, who: str, detail: str) -> None:
        self.metrics.rejected_messages.labels(reason=reason).inc()
        if (reason, who) not in self._rejected_logged:  # log each offender once, count every time
            self._rejected_logged.add((reason, who))
            log.warning("rejected peer record from %s (%s): %s", who[:16], reason, detail)

    def _update(self, view: dict[str, Member]) -> None:
        old, new = set(self._view), set(view)
        for pid in new - old - {self.self_id}:
            self.metrics.peer_joins.inc()
            log.info("peer joined: %s (%s)", pid[-8:], view[pid].record.device)
        for pid in old - new - {self.self_id}:
            self.metrics.peer_leaves.inc()
            log.info("peer left: %s", pid[-8:])
        self._view = view
        self.metrics.peers_seen.set(len(self.others()) + 1)

    # ---- queries -----------------------------------------------------------------------
    def members(self) -> list[Member]:
        now = get_dht_time()
        return [m for m in self._view.values() if m.expires_at > now]

    def others(self) -> list[Member]:
        return [m for m in self.members() if m.peer_id != self.self_id]

    def left_since(self, since: float, strategy: str | None = None) -> int:
        """Peers (of `strategy`, when given) that left gracefully at or after DHT time `since`
        and are not back in the view."""
        live = {m.peer_id for m in self.members()}
        return sum(1 for pid, (t, strat) in self._left.items()
                   if t >= since and pid not in live and strategy in (None, strat))

    def now(self) -> float:
        """DHT time (what `left_since` and record expiries are measured in)."""
        return get_dht_time()

    def own_maddrs(self) -> list[str]:
        """The addresses this peer announces (where others reach it)."""
        return list(getattr(self.make_record("online"), "maddrs", ()))

    def known_maddrs(self) -> list[str]:
        return [a for m in self.others() for a in m.record.maddrs]
