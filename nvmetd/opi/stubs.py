"""The OPI protobuf and gRPC modules, taken from pydpu (PyPI, pinned to 0.2.1 in pyproject.toml).

Why pydpu's rather than our own protoc run: pydpu is the maintained OPI client library, its stubs are generated
from one opi-api revision with protobuf 4.25.2, and a protoc step at build time would add grpcio-tools and a
proto checkout to every install for the same descriptors. Importing them through this module keeps that choice in
one place.
"""

from __future__ import annotations

from pydpu.proto.v1 import (  # type: ignore[import-untyped]
    backend_nvme_pb2,
    backend_nvme_pb2_grpc,
    frontend_nvme_pb2,
    frontend_nvme_pb2_grpc,
    middleend_encryption_pb2,
    middleend_encryption_pb2_grpc,
    middleend_qos_volume_pb2,
    middleend_qos_volume_pb2_grpc,
    opicommon_pb2,
)

__all__ = [
    "backend_nvme_pb2",
    "backend_nvme_pb2_grpc",
    "frontend_nvme_pb2",
    "frontend_nvme_pb2_grpc",
    "middleend_encryption_pb2",
    "middleend_encryption_pb2_grpc",
    "middleend_qos_volume_pb2",
    "middleend_qos_volume_pb2_grpc",
    "opicommon_pb2",
]
