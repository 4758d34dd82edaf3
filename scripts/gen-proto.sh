#!/usr/bin/env bash
# Regenerate vpblu/stream/proto/mesh_pb2.py, mesh_pb2.pyi and mesh_grpc.py from mesh.proto.
# Needs the test extras (grpcio-tools, grpclib's protoc plugin) in .venv.
# OUT=<dir> writes the generated tree there instead (the unit test compares).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${OUT:-$root}
# protoc finds protoc-gen-grpclib_python on PATH only.
export PATH="$root/.venv/bin:$PATH"
mkdir -p "$out"
.venv/bin/python -m grpc_tools.protoc -I . \
  --python_out="$out" --pyi_out="$out" --grpclib_python_out="$out" \
  vpblu/stream/proto/mesh.proto
