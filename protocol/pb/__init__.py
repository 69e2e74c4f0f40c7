"""Generated protobuf modules (see proto/ and tests/test_proto_in_sync.py)."""
