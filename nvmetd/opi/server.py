"""The OPI gRPC server: on a Unix socket by default (mode 0660, like the HTTP API's), on TCP only when
configured, and then only with TLS and a client certificate signed by the configured CA (mutual TLS): a DPU's
control API must not be reachable by anyone on the network.
"""

from __future__ import annotations

import os
from concurrent import futures
from pathlib import Path

import grpc
from pydantic import BaseModel, ConfigDict

from nvmetd.manager import Manager
from nvmetd.opi.frontend import Frontend
from nvmetd.opi.middleend import EncryptedVolumes, QosVolumes
from nvmetd.opi.remote import Remote
from nvmetd.opi.stubs import (
    backend_nvme_pb2_grpc,
    frontend_nvme_pb2_grpc,
    middleend_encryption_pb2_grpc,
    middleend_qos_volume_pb2_grpc,
)

DEFAULT_OPI_SOCKET = Path("/run/nvmetd/opi.sock")


class OpiConfig(BaseModel):
    """[opi] in nvmetd.toml."""

    model_config = ConfigDict(extra="forbid", strict=True)
    socket: str | None = None  # the Unix socket (default /run/nvmetd/opi.sock)
    tcp: str | None = None  # "address:port": also listen on TCP, with mutual TLS (the three files below)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None

    def check(self) -> OpiConfig:
        if self.tcp is not None:
            missing = [f for f in ("tls_cert", "tls_key", "tls_client_ca") if not getattr(self, f)]
            if missing:
                raise ValueError(f"opi.tcp needs {', '.join('opi.' + m for m in missing)}: the OPI API is served "
                                 "on TCP only with TLS and a client certificate")
            host, _, port = self.tcp.rpartition(":")
            if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(f"opi.tcp {self.tcp!r} is not address:port")
        return self


def build(manager: Manager, socket: Path, config: OpiConfig | None = None, workers: int = 8) -> grpc.Server:
    """A started-ready (not yet started) server with every OPI storage service on `manager`."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="opi"))
    frontend_nvme_pb2_grpc.add_FrontendNvmeServiceServicer_to_server(Frontend(manager), server)
    backend_nvme_pb2_grpc.add_NvmeRemoteControllerServiceServicer_to_server(Remote(manager), server)
    middleend_qos_volume_pb2_grpc.add_MiddleendQosVolumeServiceServicer_to_server(QosVolumes(manager), server)
    middleend_encryption_pb2_grpc.add_MiddleendEncryptionServiceServicer_to_server(EncryptedVolumes(manager),
                                                                                   server)
    socket.parent.mkdir(parents=True, exist_ok=True)
    socket.unlink(missing_ok=True)
    old = os.umask(0o117)  # the socket is created 0660 from the start, never briefly world-writable
    try:
        if server.add_insecure_port(f"unix:{socket}") == 0:
            raise OSError(f"cannot listen on {socket}")
    finally:
        os.umask(old)
    if config is not None and config.tcp is not None:
        creds = grpc.ssl_server_credentials(
            [(Path(config.tls_key or "").read_bytes(), Path(config.tls_cert or "").read_bytes())],
            root_certificates=Path(config.tls_client_ca or "").read_bytes(), require_client_auth=True)
        if server.add_secure_port(config.tcp, creds) == 0:
            raise OSError(f"cannot listen on {config.tcp}")
    return server
