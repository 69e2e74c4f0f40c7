"""The wire layer: what peers say to each other, and how.

  records.py    DHT key layout and the versioned records stored under it
  signing.py    identity keys, peer ids, signing contexts; sign and verify every signed record
  dht_signing.py  the DHT record validator: every record signed by its writer, checked on store and read
  messages.py   the protobuf message types, by protocol (the one importer of pb/)
  clock.py      the swarm's shared clock (DHT time)
  codec.py      torch tensors <-> protobuf tensor messages (chunked, size- and dtype-checked)
  transport.py  protobuf streams between peers over hivemind's P2P; bytes counted per channel
  bulk_tcp.py   the all-reduce's bulk data path on direct TCP sockets
  averaging/    how peers combine tensors: butterfly all-reduce, round transactions, state
                transfer, weighted means, robust combination, the deadlines of every exchange
  pb/           code generated from proto/*.proto (never edited by hand)
"""
