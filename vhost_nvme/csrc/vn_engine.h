/* SPDX-License-Identifier: Apache-2.0 */
/*
 * vhost_nvme engine: the C data plane that processes NVMe queues living in
 * guest memory.  Python owns the controller state machine and the admin
 * queue; this code owns I/O queue processing, PRP translation and backing
 * file submission.
 */
#ifndef VN_ENGINE_H
#define VN_ENGINE_H

#include <stdint.h>

#define VN_PAGE_SHIFT		12
#define VN_PAGE_SIZE		(1u << VN_PAGE_SHIFT)
#define VN_MAX_REGIONS		8
#define VN_MAX_QID		64	/* I/O queues 1..63, admin 0 */
#define VN_MAX_VECTORS		64
#define VN_MAX_NS		32
#define VN_MAX_WORKERS		8
#define VN_MDTS			5	/* 2^5 pages = 128 KiB per command */
#define VN_MAX_XFER		(VN_PAGE_SIZE << VN_MDTS)
#define VN_MAX_IOV		(1 + (1 << VN_MDTS))
#define VN_MQES			1023	/* 0-based: 1024 entries */
#define VN_ERR_RING		16

/* NVMe status: SCT << 8 | SC, plus DNR (bit 14) as carried in CQE DW3[31:17] */
#define VN_SC_SUCCESS		0x0000
#define VN_SC_INVALID_OPCODE	0x0001
#define VN_SC_INVALID_FIELD	0x0002
#define VN_SC_DATA_XFER_ERROR	0x0004
#define VN_SC_INTERNAL		0x0006
#define VN_SC_ABORT_SQ_DELETE	0x0008
#define VN_SC_INVALID_NS	0x000b
#define VN_SC_CMD_SEQ_ERROR	0x000c
#define VN_SC_INVALID_PRP_OFS	0x0013
#define VN_SC_NS_WRITE_PROT	0x0020
#define VN_SC_LBA_RANGE		0x0080
#define VN_SC_CAP_EXCEEDED	0x0081
#define VN_SC_DNR		0x4000

enum vn_ns_kind {
	VN_NS_FILE = 0,
	VN_NS_BLOCK = 1,
	VN_NS_NULL = 2,
};

enum vn_policy {
	VN_POLICY_AUTO = 0,	/* choose per batch from the attach-time probe */
	VN_POLICY_PSYNC = 1,
	VN_POLICY_URING = 2,
};

struct vn_ns_stats {
	uint64_t reads;
	uint64_t writes;
	uint64_t read_bytes;
	uint64_t write_bytes;
	uint64_t others;
	uint64_t errors;
	uint64_t throttled;
	uint64_t psync_ios;
	uint64_t uring_ios;
};

struct vn_ctrl_stats {
	uint64_t cqes;
	uint64_t signals;
	uint64_t kicks;
	uint64_t sleeps;
	uint64_t polls;
	uint64_t invalid_doorbells;
	uint64_t poll_window_ns;	/* current busy-poll window (largest over the workers) */
};

struct vn_err {
	uint16_t sqid;
	uint16_t cid;
	uint16_t status;
	uint16_t rsvd;
	uint32_t nsid;
	uint32_t rsvd2;
	uint64_t lba;
};

struct vn_probe {
	double psync_iops;	/* single-threaded pread, depth 1 */
	double uring_iops_qd1;
	double uring_iops_qd32;
	int uring_min_batch;	/* batches at least this deep go to io_uring; 0 = never */
};

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

int vn_cq_create(struct vn_ctrl *c, unsigned int qid, uint64_t gpa, unsigned int size, unsigned int iv, int ien);
int vn_sq_create(struct vn_ctrl *c, unsigned int qid, uint64_t gpa, unsigned int size, unsigned int cqid);
void vn_sq_delete(struct vn_ctrl *c, unsigned int qid);
void vn_cq_delete(struct vn_ctrl *c, unsigned int qid);
int vn_sq_fetch(struct vn_ctrl *c, unsigned int qid, void *sqe);
int vn_cq_post(struct vn_ctrl *c, unsigned int cqid, unsigned int sqid, uint16_t cid, uint16_t status, uint32_t dw0);
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

#endif
