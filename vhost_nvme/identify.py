"""Identify data structures (NVMe 1.4 layouts), built as bytes from controller and namespace facts."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .namespace import Kind, Namespace
from .nvme_spec import ERR_LOG_ENTRIES, MAX_NS, MDTS, NVME_VERSION, PAGE_SIZE

OACS_DBBUF = 1 << 8
ONCS_DSM = 1 << 2
ONCS_WRITE_ZEROES = 1 << 3
OAES_NS_ATTR = 1 << 8
NSFEAT_THINP = 1 << 0
NSFEAT_NSABP = 1 << 1
NSFEAT_OPTPERF = 1 << 4
DLFEAT_READ_ZEROES = 0x01
DLFEAT_WZ_DEAC = 0x08


@dataclass(frozen=True)
class ControllerIdentity:
    serial: str
    model: str
    firmware: str
    subnqn: str
    cntlid: int = 1


def _ascii(text: str, width: int) -> bytes:
    """Identify strings are space padded, never NUL terminated."""
    return text.encode("ascii", "replace")[:width].ljust(width, b" ")


def identify_controller(ident: ControllerIdentity, dbbuf: bool = True) -> bytes:
    b = bytearray(PAGE_SIZE)
    struct.pack_into("<HH", b, 0, 0, 0)  # VID/SSVID: the front-end's PCI config carries the real IDs
    b[4:24] = _ascii(ident.serial, 20)
    b[24:64] = _ascii(ident.model, 40)
    b[64:72] = _ascii(ident.firmware, 8)
    b[77] = MDTS
    struct.pack_into("<H", b, 78, ident.cntlid)
    struct.pack_into("<I", b, 80, NVME_VERSION)
    struct.pack_into("<I", b, 92, OAES_NS_ATTR)
    b[111] = 1  # CNTRLTYPE: I/O controller
    struct.pack_into("<H", b, 256, OACS_DBBUF if dbbuf else 0)
    b[258] = 3  # ACL: 4 outstanding aborts
    b[259] = 3  # AERL: 4 outstanding AERs
    b[260] = 0x03  # FRMW: one slot, read-only
    b[261] = 0x04  # LPA: extended data for Get Log Page
    b[262] = ERR_LOG_ENTRIES - 1
    struct.pack_into("<HH", b, 266, 343, 373)  # WCTEMP, CCTEMP (Kelvin)
    struct.pack_into("<H", b, 320, 1)  # KAS: keep alive supported, 100 ms granularity
    b[512] = 0x66  # SQES
    b[513] = 0x44  # CQES
    struct.pack_into("<I", b, 516, MAX_NS)
    struct.pack_into("<H", b, 520, ONCS_DSM | ONCS_WRITE_ZEROES)
    b[525] = 0x07  # VWC present; Flush with NSID FFFFFFFFh supported
    b[768:1024] = ident.subnqn.encode("ascii")[:255].ljust(256, b"\0")
    struct.pack_into("<H", b, 2048, 2500)  # PSD0 max power 25 W
    return bytes(b)


def _blocks_minus_one(nbytes: int, lba: int) -> int:
    return max(nbytes // lba, 1) - 1 if nbytes else 0


def identify_namespace(ns: Namespace) -> bytes:
    b = bytearray(PAGE_SIZE)
    t = ns.topology
    lba = ns.lba_size
    struct.pack_into("<QQQ", b, 0, ns.nblocks, ns.nblocks, ns.used_blocks())
    nsfeat = NSFEAT_OPTPERF | NSFEAT_NSABP
    if ns.kind == Kind.FILE:
        nsfeat |= NSFEAT_THINP
    b[24] = nsfeat
    b[25] = 0  # NLBAF: one format
    b[26] = 0  # FLBAS
    # Files punch holes (or write zeros) so deallocated blocks read as zeros; discard on a block device
    # promises nothing, and the null namespace returns no data at all.
    b[33] = DLFEAT_READ_ZEROES | DLFEAT_WZ_DEAC if ns.kind == Kind.FILE else 0
    phys = _blocks_minus_one(t.physical_block, lba)
    # Linux clamps the physical block size by the atomic write unit, so report it as atomic too.
    struct.pack_into("<HH", b, 34, phys, phys)  # NAWUN, NAWUPF
    struct.pack_into("<QQ", b, 48, ns.nblocks * lba, 0)  # NVMCAP
    npdg = _blocks_minus_one(t.discard_granularity, lba)
    nows = _blocks_minus_one(t.optimal_io, lba) if t.optimal_io else phys
    struct.pack_into("<HHHHH", b, 64, phys, phys, npdg, npdg, nows)  # NPWG NPWA NPDG NPDA NOWS
    b[99] = 1 if ns.readonly else 0  # NSATTR: write protected
    b[104:120] = ns.uuid.bytes  # NGUID
    struct.pack_into("<I", b, 128, ns.lba_shift << 16)  # LBAF0: MS 0, LBADS
    return bytes(b)


def active_ns_list(nsids: list[int], after: int) -> bytes:
    ids = sorted(n for n in nsids if n > after)[: PAGE_SIZE // 4]
    return struct.pack(f"<{len(ids)}I", *ids).ljust(PAGE_SIZE, b"\0")


def ns_descriptor_list(ns: Namespace) -> bytes:
    out = bytearray()
    out += struct.pack("<BBH", 0x02, 16, 0) + ns.uuid.bytes  # NGUID
    out += struct.pack("<BBH", 0x03, 16, 0) + ns.uuid.bytes  # UUID
    out += struct.pack("<BBH", 0x04, 1, 0) + b"\0"  # CSI: NVM command set
    return bytes(out).ljust(PAGE_SIZE, b"\0")
