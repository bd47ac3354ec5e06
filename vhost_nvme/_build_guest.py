"""cffi (API mode) build of the guest driver's queue helpers and benchmark loop."""

import os
from pathlib import Path

from cffi import FFI

# setuptools insists on relative source paths
CSRC = Path(os.path.relpath(Path(__file__).resolve().parent / "csrc"))

CDEF = """
struct vg_queue {
    uint16_t qid; uint16_t size; uint16_t sq_tail; uint16_t sq_head; uint16_t cq_head;
    uint16_t sq_db_last; uint16_t cq_db_last; uint8_t phase; uint8_t pad;
    uint8_t *sq; uint8_t *cq; uint32_t *mirror_sq; uint32_t *mirror_cq; int kick_fd; int pad2;
    uint32_t *shadow_sq; uint32_t *shadow_cq; uint32_t *ei_sq; uint32_t *ei_cq;
    uint64_t traps; uint64_t rings;
};
struct vg_bench {
    struct vg_queue *q; uint32_t nsid; uint32_t lba_shift; uint64_t nblocks; uint32_t qd; uint32_t opc;
    uint32_t bs; uint32_t flags; uint64_t *buf_gpa; uint64_t seed; double duration_s;
    uint64_t ios; uint64_t errors; uint64_t bad_cqes; double elapsed_s;
    uint32_t *lat_ns; uint64_t lat_cap; uint64_t lat_n; uint64_t *prp2_gpa; uint64_t cursor;
};
int vg_sq_space(struct vg_queue *q);
int vg_submit(struct vg_queue *q, const void *sqe, int ring);
void vg_ring_sq(struct vg_queue *q);
int vg_reap(struct vg_queue *q, void *cqes, int max, int ring);
void vg_ring_cq(struct vg_queue *q);
int vg_bench_run(struct vg_bench *b);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "vhost_nvme._guest_c",
    '#include "vg_guest.h"',
    sources=[str(CSRC / "vg_guest.c")],
    include_dirs=[str(CSRC)],
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-parameter", "-std=gnu11"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
