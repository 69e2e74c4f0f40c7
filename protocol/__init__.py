"""Wire layer: DHT records, tensor codec, RPC helpers."""
