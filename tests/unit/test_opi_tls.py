"""[opi] in nvmetd.toml: TCP only with TLS and a client certificate, checked whole at load; and the TCP listener
really refuses a client without a certificate from the configured CA (certificates made here with openssl)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import grpc
import pytest

from nvmetd.manager import Manager
from nvmetd.opi.server import OpiConfig, build
from nvmetd.opi.stubs import frontend_nvme_pb2 as fpb
from nvmetd.opi.stubs import frontend_nvme_pb2_grpc as fgrpc
from nvmetd.service import load_config
from target.store import StateStore
from tests.unit.fakes import FakeFS, FakeKernel


@pytest.mark.parametrize(("text", "error"), [
    ('[opi]\ntcp = "127.0.0.1:50051"\n', "opi.tcp needs opi.tls_cert, opi.tls_key, opi.tls_client_ca"),
    ('[opi]\ntcp = "127.0.0.1"\ntls_cert = "c"\ntls_key = "k"\ntls_client_ca = "a"\n', "not address:port"),
    ("[opi]\nbogus = 1\n", "opi.bogus"),
    ('opi = "on"\n', "must be a table"),
])
def test_bad_opi_table_is_refused(tmp_path: Path, text: str, error: str) -> None:
    (tmp_path / "nvmetd.toml").write_text(text)
    with pytest.raises(ValueError, match=error):
        load_config(tmp_path / "nvmetd.toml")


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _cert(d: Path, name: str, ca: str | None, cn: str) -> None:
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / f"{name}.key"),
             "-out", str(d / f"{name}.csr"), "-subj", f"/CN={cn}")
    ext = d / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n" if name == "server" else "extendedKeyUsage=clientAuth\n")
    _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / f"{ca}.crt"), "-CAkey",
             str(d / f"{ca}.key"), "-CAcreateserial", "-days", "2", "-out", str(d / f"{name}.crt"),
             "-extfile", str(ext))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tcp_listener_wants_a_client_certificate_from_the_ca(tmp_path: Path) -> None:
    d = tmp_path
    for ca in ("ca", "rogue"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / f"{ca}.key"), "-out",
                 str(d / f"{ca}.crt"), "-days", "2", "-subj", f"/CN={ca}")
    _cert(d, "server", "ca", "nvmetd")
    _cert(d, "client", "ca", "host")
    _cert(d, "stranger", "rogue", "host")
    FakeKernel(d / "nvmet")
    manager = Manager(StateStore(d / "state.json"), FakeFS(root=d / "nvmet"), pools_root=d / "pools",
                      keys_dir=d / "keys", host_connect=False)
    port = _free_port()
    config = OpiConfig(tcp=f"127.0.0.1:{port}", tls_cert=str(d / "server.crt"), tls_key=str(d / "server.key"),
                       tls_client_ca=str(d / "ca.crt")).check()
    server = build(manager, d / "opi.sock", config)
    server.start()

    def call(client: str | None) -> grpc.StatusCode:
        creds = grpc.ssl_channel_credentials(
            root_certificates=(d / "ca.crt").read_bytes(),
            private_key=(d / f"{client}.key").read_bytes() if client else None,
            certificate_chain=(d / f"{client}.crt").read_bytes() if client else None)
        with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
            try:
                fgrpc.FrontendNvmeServiceStub(channel).ListNvmeSubsystems(fpb.ListNvmeSubsystemsRequest(), timeout=10)
            except grpc.RpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

    try:
        assert call("client") == grpc.StatusCode.OK
        assert call(None) == grpc.StatusCode.UNAVAILABLE
        assert call("stranger") == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(f"127.0.0.1:{port}") as plain, pytest.raises(grpc.RpcError):
            fgrpc.FrontendNvmeServiceStub(plain).ListNvmeSubsystems(fpb.ListNvmeSubsystemsRequest(), timeout=10)
    finally:
        server.stop(grace=0).wait()
