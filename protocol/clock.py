"""The swarm's shared clock: wall time as the DHT keeps it, for record expirations and for
schedules every peer must compute alike (SAPO rounds, stage-averaging epochs)."""
from __future__ import annotations

from hivemind.utils import get_dht_time


def swarm_time() -> float:
    """Seconds since the epoch, the time DHT records expire by."""
    return get_dht_time()
