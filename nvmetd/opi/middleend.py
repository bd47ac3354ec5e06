"""MiddleendQosVolumeService and MiddleendEncryptionService: refused clearly, never accepted and ignored.

QoS: nvmet submits its bios from its own kernel workers, charged to the root cgroup, so io.max cannot limit a
namespace; until nvmetd has a limit mechanism (the throttling issue), creating a QoS volume is FAILED_PRECONDITION
and there are none to list, get or delete. Encryption: nvmetd's LUKS layer is chosen when a disk is created
(`nvmetctl disk create --encrypted`), not stacked on an existing volume with a client's key; this API does not
serve that (UNIMPLEMENTED, with the reason).
"""

from __future__ import annotations

from typing import Any

import grpc

from nvmetd.opi.common import Refused, Service, not_found, parse
from nvmetd.opi.stubs import middleend_encryption_pb2_grpc as enc_grpc
from nvmetd.opi.stubs import middleend_qos_volume_pb2 as qos
from nvmetd.opi.stubs import middleend_qos_volume_pb2_grpc as qos_grpc

NO_QOS = ("QoS volumes need limits nvmetd cannot enforce on the kernel target yet (nvmet's I/O bypasses cgroup "
          "io.max); nothing was created")
NO_ENCRYPTION = ("encrypted volumes over an existing volume with a client key are not served: create the disk "
                 "encrypted with nvmetd (LUKS, `nvmetctl disk create --encrypted`) and use it as the volume")


class QosVolumes(Service, qos_grpc.MiddleendQosVolumeServiceServicer):
    def CreateQosVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        def run() -> Any:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, NO_QOS)

        return self.handle(context, run)

    def ListQosVolumes(self, request: Any, context: grpc.ServicerContext) -> Any:
        return qos.ListQosVolumesResponse()

    def _missing(self, name: str, context: grpc.ServicerContext, allow_missing: bool = False) -> Any:
        def run() -> Any:
            parse(name, "qosVolumes")
            if allow_missing:
                from google.protobuf import empty_pb2

                return empty_pb2.Empty()
            raise not_found("QoS volume", name)

        return self.handle(context, run)

    def GetQosVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._missing(request.name, context)

    def StatsQosVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._missing(request.name, context)

    def DeleteQosVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._missing(request.name, context, request.allow_missing)

    def UpdateQosVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._missing(request.qos_volume.name, context)


class EncryptedVolumes(Service, enc_grpc.MiddleendEncryptionServiceServicer):
    def CreateEncryptedVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, NO_ENCRYPTION)
