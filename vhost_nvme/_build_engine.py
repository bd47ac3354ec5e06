"""cffi (API mode) build of the engine's C data plane; run by setup.py at install time."""

import os
from pathlib import Path

from cffi import FFI

# setuptools insists on relative source paths
CSRC = Path(os.path.relpath(Path(__file__).resolve().parent / "csrc"))

CDEF = """
struct vn_ns_stats {
    uint64_t reads; uint64_t writes; uint64_t read_bytes; uint64_t write_bytes;
    uint64_t others; uint64_t errors; uint64_t throttled; uint64_t psync_ios; uint64_t uring_ios;
};
struct vn_ctrl_stats {
    uint64_t cqes; uint64_t signals; uint64_t kicks; uint64_t sleeps; uint64_t polls;
    uint64_t invalid_doorbells; uint64_t poll_window_ns;
};
struct vn_err {
    uint16_t sqid; uint16_t cid; uint16_t status; uint16_t rsvd; uint32_t nsid; uint32_t rsvd2; uint64_t lba;
};
struct vn_probe { double psync_iops; double uring_iops_qd1; double uring_iops_qd32; int uring_min_batch; };
struct vn_ctrl;

struct vn_ctrl *vn_ctrl_new(int nworkers, unsigned int poll_us);
void vn_ctrl_set_poll(struct vn_ctrl *c, unsigned int poll_us, int adaptive);
void vn_ctrl_free(struct vn_ctrl *c);
int vn_ctrl_start(struct vn_ctrl *c);
void vn_ctrl_pause(struct vn_ctrl *c);
void vn_ctrl_resume(struct vn_ctrl *c);
void vn_ctrl_get_stats(struct vn_ctrl *c, struct vn_ctrl_stats *out);
int vn_err_pop(struct vn_ctrl *c, struct vn_err *out);
void vn_set_wce(struct vn_ctrl *c, int on);

int vn_mem_add(struct vn_ctrl *c, int fd, uint64_t fd_offset, uint64_t gpa, uint64_t size);
void vn_mem_clear(struct vn_ctrl *c);
void *vn_gpa(struct vn_ctrl *c, uint64_t gpa, uint64_t len);
uint16_t vn_prp_copy(struct vn_ctrl *c, uint64_t prp1, uint64_t prp2, void *buf, uint32_t len, int to_guest);

int vn_set_db_mirror(struct vn_ctrl *c, int fd, uint64_t offset);
uint32_t vn_db_mirror_read(struct vn_ctrl *c, unsigned int slot);
void vn_db_mirror_write(struct vn_ctrl *c, unsigned int slot, uint32_t val);
int vn_set_kick(struct vn_ctrl *c, unsigned int qid, int fd);
int vn_set_call(struct vn_ctrl *c, unsigned int vector, int fd);
void vn_signal_vector(struct vn_ctrl *c, unsigned int vector);
void vn_doorbell_wake(struct vn_ctrl *c, unsigned int qid);

int vn_cq_create(struct vn_ctrl *c, unsigned int qid, uint64_t gpa, unsigned int size, unsigned int iv,
                 int ien);
int vn_sq_create(struct vn_ctrl *c, unsigned int qid, uint64_t gpa, unsigned int size, unsigned int cqid);
void vn_sq_delete(struct vn_ctrl *c, unsigned int qid);
void vn_cq_delete(struct vn_ctrl *c, unsigned int qid);
int vn_sq_fetch(struct vn_ctrl *c, unsigned int qid, void *sqe);
int vn_cq_post(struct vn_ctrl *c, unsigned int cqid, unsigned int sqid, uint16_t cid, uint16_t status,
               uint32_t dw0);
int vn_dbbuf_set(struct vn_ctrl *c, uint64_t shadow_gpa, uint64_t ei_gpa);
void vn_dbbuf_clear(struct vn_ctrl *c);

int vn_ns_attach(struct vn_ctrl *c, unsigned int nsid, int fd, int kind, uint64_t nblocks,
                 unsigned int lba_shift, int readonly, int policy);
void vn_ns_detach(struct vn_ctrl *c, unsigned int nsid);
void vn_ns_set_limits(struct vn_ctrl *c, unsigned int nsid, uint64_t iops, uint64_t bps);
int vn_ns_probe(struct vn_ctrl *c, unsigned int nsid, struct vn_probe *out);
void vn_ns_set_uring_min_batch(struct vn_ctrl *c, unsigned int nsid, int min_batch);
void vn_ns_get_stats(struct vn_ctrl *c, unsigned int nsid, struct vn_ns_stats *out);
int vn_ns_flush(struct vn_ctrl *c, unsigned int nsid);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "vhost_nvme._engine_c",
    '#include "vn_engine.h"',
    sources=[str(CSRC / name) for name in ("vn_mem.c", "vn_ctrl.c", "vn_ns.c", "vn_dataplane.c")],
    include_dirs=[str(CSRC)],
    libraries=["uring", "pthread"],
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-parameter", "-std=gnu11"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
