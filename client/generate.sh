#!/usr/bin/env bash
# Regenerates the Python code and type stubs for client/petri/v1/*.proto, next to the .proto files,
# so that the import path equals the proto package (petri.v1) and nothing needs rewriting.
#
# grpcio-tools is pinned to 1.80.0 because its protoc emits gencode for protobuf 6.31.1 and
# grpc 1.80.0: the versions inside the sandbox image. Newer runtimes load it; older ones would not.
set -euo pipefail
cd "$(dirname "$0")"
python -m grpc_tools.protoc -I . \
  --python_out=. --grpc_python_out=. \
  --mypy_out=. --mypy_grpc_out=. \
  petri/v1/*.proto
echo "generated: $(ls petri/v1/*_pb2*.py* | tr '\n' ' ')"
