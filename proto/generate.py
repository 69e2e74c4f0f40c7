"""Regenerate protocol/pb/*_pb2*.py from proto/*.proto.

Run `python proto/generate.py` after editing a .proto. tests/unit/test_proto_in_sync.py fails
when the committed generated code differs from a fresh generation.

Every proto here declares `package swarmnode.v1` (or a sub-package) and has a file name
starting with `swarm_node_`, so nothing collides with hivemind's package-less protos
(`duplicate symbol 'Tensor'`) in the process-wide descriptor pool.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = PROTO_DIR.parent / "protocol" / "pb"
# protoc writes `import swarm_node_x_pb2 as ...`; our modules live in a package.
_ABSOLUTE_IMPORT = re.compile(r"^import (swarm_node_\w+_pb2) as", re.MULTILINE)


def generate(out_dir: Path = DEFAULT_OUT) -> list[Path]:
    from grpc_tools import protoc  # test-only dependency (grpcio-tools)
    import grpc_tools

    out_dir.mkdir(parents=True, exist_ok=True)
    sources = sorted(PROTO_DIR.glob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *map(str, sources),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    written = []
    for path in sorted(out_dir.glob("swarm_node_*_pb2*.py")):
        text = _ABSOLUTE_IMPORT.sub(r"from . import \1 as", path.read_text())
        if path.name.endswith("_pb2_grpc.py") and "class " not in text:
            path.unlink()  # messages-only protos produce an empty grpc stub
            continue
        path.write_text(text)
        written.append(path)
    return written


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    for p in generate(out):
        print(p)
