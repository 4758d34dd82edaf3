"""The committed generated code is exactly what scripts/gen-proto.sh produces."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("mesh_pb2.py", "mesh_pb2.pyi", "mesh_grpc.py")


def test_regenerating_yields_the_committed_files(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen-proto.sh")],
        env={**os.environ, "OUT": str(tmp_path)},
        check=True,
        timeout=60,
    )
    for name in GENERATED:
        fresh = (tmp_path / "vpblu" / "stream" / "proto" / name).read_bytes()
        committed = (ROOT / "vpblu" / "stream" / "proto" / name).read_bytes()
        assert fresh == committed, f"vpblu/stream/proto/{name} is stale: run scripts/gen-proto.sh"


def test_the_service_has_one_bidirectional_method() -> None:
    from vpblu.stream.proto import mesh_pb2

    service = mesh_pb2.DESCRIPTOR.services_by_name["Mesh"]
    (method,) = service.methods
    assert method.name == "Connect"
    assert method.client_streaming and method.server_streaming
    assert method.input_type.name == "NodeMessage"
    assert method.output_type.name == "ControllerMessage"
