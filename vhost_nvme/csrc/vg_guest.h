/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Guest-side queue helpers: what a guest NVMe driver does with its queues
 * (write SQEs, ring doorbells through shadow buffers and EventIdx, reap CQEs
 * by phase), plus the benchmark submission loop, so the benchmark's guest is
 * never the bottleneck.  A "trap" is the emulated MMIO doorbell write: the
 * front-end stores the value in the mirror page and kicks the eventfd.
 */
#ifndef VG_GUEST_H
#define VG_GUEST_H

#include <stdint.h>

struct vg_queue {
	uint16_t qid;
	uint16_t size;
	uint16_t sq_tail;
	uint16_t sq_head;
	uint16_t cq_head;
	uint16_t sq_db_last;
	uint16_t cq_db_last;
	uint8_t phase;
	uint8_t pad;
	uint8_t *sq;
	uint8_t *cq;
	uint32_t *mirror_sq;
	uint32_t *mirror_cq;
	int kick_fd;
	int pad2;
	uint32_t *shadow_sq;
	uint32_t *shadow_cq;
	uint32_t *ei_sq;
	uint32_t *ei_cq;
	uint64_t traps;
	uint64_t rings;
};

struct vg_bench {
	struct vg_queue *q;
	uint32_t nsid;
	uint32_t lba_shift;
	uint64_t nblocks;
	uint32_t qd;
	uint32_t opc;
	uint32_t bs;
	uint32_t flags;		/* VG_SEQUENTIAL */
	uint64_t *buf_gpa;
	uint64_t seed;
	double duration_s;
	/* results */
	uint64_t ios;
	uint64_t errors;
	uint64_t bad_cqes;
	double elapsed_s;
	uint32_t *lat_ns;
	uint64_t lat_cap;
	uint64_t lat_n;
	uint64_t *prp2_gpa;	/* per cid: PRP2 (a page or a PRP list) for bs > 4 KiB; NULL: PRP1 only */
	uint64_t cursor;	/* next LBA of a sequential run */
};

#define VG_SEQUENTIAL	1

int vg_sq_space(struct vg_queue *q);
int vg_submit(struct vg_queue *q, const void *sqe, int ring);
void vg_ring_sq(struct vg_queue *q);
int vg_reap(struct vg_queue *q, void *cqes, int max, int ring);
void vg_ring_cq(struct vg_queue *q);
int vg_bench_run(struct vg_bench *b);

#endif
