"""In-memory stand-ins for the network, so round logic runs as N peers in one event loop.

  transport.py  InMemoryNetwork: FakeTransport objects (the real protocol.transport.Transport
                over an in-memory P2P) with injectable faults: partition/heal, kill, delay,
                and streams that die after N messages
  context.py    node settings and options for a test's strategy context, from a config
"""
