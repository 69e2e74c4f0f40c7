"""The all-reduce's bulk TCP listener against a host that opens connections and sends nothing."""
from __future__ import annotations

import pytest


def test_one_source_holding_idle_bulk_connections_cannot_lock_the_reducer_out():
    """Idle connections from one address are capped per source and counted; once they go, a
    member with a token gets in again (a per-source limit, under the listener's global cap)."""
    import asyncio
    import socket

    from swarm_node.protocol import bulk_tcp

    async def go():
        reached, rejects = [], []

        async def handler(sock, session):
            reached.append(session)

        server = bulk_tcp.BulkServer(handler, host="127.0.0.1", on_reject=rejects.append, max_per_source=3)
        await server.start()
        idle = []
        try:
            for _ in range(5):  # the rogue: connect, send nothing
                s = socket.create_connection(("127.0.0.1", server.port))
                idle.append(s)
            await asyncio.sleep(0.3)
            assert rejects.count("too_many_connections") == 2
            token = server.issue("member", ttl_s=10)
            with pytest.raises(bulk_tcp.BulkUnavailable):  # same address, still full
                await bulk_tcp.connect(server.hosts, server.port, token, timeout_s=1)
            for s in idle:
                s.close()
            await asyncio.sleep(0.3)
            sock = await bulk_tcp.connect(server.hosts, server.port, server.issue("member", ttl_s=10), timeout_s=3)
            sock.close()
            await asyncio.sleep(0.1)
            assert reached == ["member"]
        finally:
            for s in idle:
                s.close()
            await server.close()

    asyncio.run(go())
