"""NVMe constants shared by the engine's control plane and the guest driver.

Kept in one module so the engine and the test guest cannot silently disagree on a number.
"""

from enum import IntEnum

PAGE_SIZE = 4096
MAX_QID = 64  # admin queue + 63 I/O queues (matches VN_MAX_QID in csrc)
MAX_VECTORS = 64
MAX_NS = 32
MQES = 1023  # 0-based
MDTS = 5
ERR_LOG_ENTRIES = 16
NVME_VERSION = 0x00010400  # 1.4.0


class Reg(IntEnum):
    CAP = 0x00
    VS = 0x08
    INTMS = 0x0C
    INTMC = 0x10
    CC = 0x14
    CSTS = 0x1C
    NSSR = 0x20
    AQA = 0x24
    ASQ = 0x28
    ACQ = 0x30
    DOORBELLS = 0x1000


class AdminOpc(IntEnum):
    DELETE_SQ = 0x00
    CREATE_SQ = 0x01
    GET_LOG_PAGE = 0x02
    DELETE_CQ = 0x04
    CREATE_CQ = 0x05
    IDENTIFY = 0x06
    ABORT = 0x08
    SET_FEATURES = 0x09
    GET_FEATURES = 0x0A
    ASYNC_EVENT = 0x0C
    KEEP_ALIVE = 0x18
    DBBUF_CONFIG = 0x7C


class IoOpc(IntEnum):
    FLUSH = 0x00
    WRITE = 0x01
    READ = 0x02
    WRITE_ZEROES = 0x08
    DSM = 0x09


class Cns(IntEnum):
    NAMESPACE = 0x00
    CONTROLLER = 0x01
    ACTIVE_NS_LIST = 0x02
    NS_DESC_LIST = 0x03


class Fid(IntEnum):
    VOLATILE_WC = 0x06
    NUM_QUEUES = 0x07
    IRQ_COALESCE = 0x08
    IRQ_CONFIG = 0x09
    ASYNC_EVENT_CFG = 0x0B
    KEEP_ALIVE = 0x0F


class Lid(IntEnum):
    ERROR = 0x01
    SMART = 0x02
    CHANGED_NS = 0x04


class Status(IntEnum):
    """Status field as carried in CQE DW3[31:17]: SCT << 8 | SC (DNR added separately)."""

    SUCCESS = 0x000
    INVALID_OPCODE = 0x001
    INVALID_FIELD = 0x002
    DATA_XFER_ERROR = 0x004
    INTERNAL = 0x006
    INVALID_NS = 0x00B
    CMD_SEQ_ERROR = 0x00C
    INVALID_PRP_OFFSET = 0x013
    NS_WRITE_PROTECTED = 0x020
    LBA_RANGE = 0x080
    CAP_EXCEEDED = 0x081
    CQ_INVALID = 0x100
    INVALID_QID = 0x101
    INVALID_QSIZE = 0x102
    ABORT_LIMIT = 0x103
    AER_LIMIT = 0x105
    INVALID_LOG_PAGE = 0x109
    INVALID_VECTOR = 0x108
    INVALID_QUEUE_DELETION = 0x10C
    FEATURE_NOT_SAVEABLE = 0x10D


DNR = 0x4000


def status_code(status_field: int) -> int:
    """Strip DNR/More/CRD so callers compare only SCT|SC."""
    return status_field & 0x7FF


# Asynchronous event: type Notice (2), info Namespace Attribute Changed (0), log page 0x04.
AEN_NS_CHANGED = 0x2 | (0x00 << 8) | (Lid.CHANGED_NS << 16)
AEC_NS_ATTR = 1 << 8
