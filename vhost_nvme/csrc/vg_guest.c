// SPDX-License-Identifier: Apache-2.0
#define _GNU_SOURCE
#include <sched.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "vg_guest.h"

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Linux's rule: ring only if the device's EventIdx lies in [old, new). */
static int need_event(uint16_t ei, uint16_t new_idx, uint16_t old)
{
	return (uint16_t)(new_idx - ei - 1) < (uint16_t)(new_idx - old);
}

static void doorbell(struct vg_queue *q, uint32_t *mirror, uint32_t *shadow, uint32_t *ei,
		     uint16_t *last, uint16_t val)
{
	uint16_t old = *last;

	*last = val;
	q->rings++;
	if (shadow) {
		__atomic_store_n(shadow, val, __ATOMIC_RELEASE);
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
		if (!need_event((uint16_t)__atomic_load_n(ei, __ATOMIC_ACQUIRE), val, old))
			return;
	}
	/* the trap: what QEMU's MMIO handler does for a doorbell write */
	__atomic_store_n(mirror, val, __ATOMIC_RELEASE);
	{
		uint64_t one = 1;

		if (write(q->kick_fd, &one, sizeof(one)) < 0) {
			/* eventfd overflow only */
		}
	}
	q->traps++;
}

int vg_sq_space(struct vg_queue *q)
{
	return q->size - 1 - (q->sq_tail + q->size - q->sq_head) % q->size;
}

void vg_ring_sq(struct vg_queue *q)
{
	doorbell(q, q->mirror_sq, q->shadow_sq, q->ei_sq, &q->sq_db_last, q->sq_tail);
}

void vg_ring_cq(struct vg_queue *q)
{
	doorbell(q, q->mirror_cq, q->shadow_cq, q->ei_cq, &q->cq_db_last, q->cq_head);
}

int vg_submit(struct vg_queue *q, const void *sqe, int ring)
{
	if (!vg_sq_space(q))
		return -1;
	memcpy(q->sq + (size_t)q->sq_tail * 64, sqe, 64);
	q->sq_tail = (q->sq_tail + 1) % q->size;
	if (ring)
		vg_ring_sq(q);
	return 0;
}

int vg_reap(struct vg_queue *q, void *cqes, int max, int ring)
{
	int n = 0;

	while (n < max) {
		uint32_t *e = (uint32_t *)(q->cq + (size_t)q->cq_head * 16);
		uint32_t dw3 = __atomic_load_n(&e[3], __ATOMIC_ACQUIRE);

		if (((dw3 >> 16) & 1) != q->phase)
			break;
		memcpy((uint8_t *)cqes + (size_t)n * 16, e, 12);
		memcpy((uint8_t *)cqes + (size_t)n * 16 + 12, &dw3, 4);
		q->sq_head = (uint16_t)(e[2] & 0xffff);
		if (++q->cq_head == q->size) {
			q->cq_head = 0;
			q->phase ^= 1;
		}
		n++;
	}
	if (n && ring)
		vg_ring_cq(q);
	return n;
}

static uint64_t xorshift(uint64_t *s)
{
	uint64_t x = *s;

	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	*s = x;
	return x;
}

static void fill_cmd(struct vg_bench *b, uint32_t *cmd, uint16_t cid)
{
	uint32_t nlb = b->bs >> b->lba_shift;
	uint64_t slots = b->nblocks / nlb;
	uint64_t slba;
	uint64_t prp = b->buf_gpa[cid];

	if (b->flags & VG_SEQUENTIAL) {
		slba = b->cursor;
		b->cursor = (b->cursor + nlb) % (slots * nlb);
	} else {
		slba = (xorshift(&b->seed) % slots) * nlb;
	}

	memset(cmd, 0, 64);
	cmd[0] = b->opc | ((uint32_t)cid << 16);
	cmd[1] = b->nsid;
	cmd[6] = (uint32_t)prp;
	cmd[7] = (uint32_t)(prp >> 32);
	if (b->prp2_gpa) {
		cmd[8] = (uint32_t)b->prp2_gpa[cid];
		cmd[9] = (uint32_t)(b->prp2_gpa[cid] >> 32);
	}
	cmd[10] = (uint32_t)slba;
	cmd[11] = (uint32_t)(slba >> 32);
	cmd[12] = nlb - 1;
}

/*
 * Closed-loop random I/O at a fixed depth, reaping by polling the CQ phase
 * bit (like a Linux poll queue) and resubmitting every completion at once.
 * Every completion is checked: known, outstanding cid; our sqid; success.
 */
int vg_bench_run(struct vg_bench *b)
{
	struct vg_queue *q = b->q;
	uint64_t t_sub[1024], t0, deadline, now;
	uint8_t busy[1024];
	uint32_t cmd[16], cqes[64 * 4];
	uint32_t outstanding = 0, i, empty = 0;
	int stop = 0, n, k;

	if (b->qd == 0 || b->qd > 1024 || b->qd >= q->size)
		return -1;
	memset(busy, 0, sizeof(busy));
	t0 = now_ns();
	deadline = t0 + (uint64_t)(b->duration_s * 1e9);
	for (i = 0; i < b->qd; i++) {
		fill_cmd(b, cmd, (uint16_t)i);
		t_sub[i] = now_ns();
		busy[i] = 1;
		vg_submit(q, cmd, 0);
		outstanding++;
	}
	vg_ring_sq(q);
	while (outstanding) {
		n = vg_reap(q, cqes, 64, 1);
		if (!n) {
			/*
			 * The engine may share our core: after ~1000 empty
			 * polls (a few us, longer than a QD1 read takes when
			 * it runs elsewhere) yield every 32.  Yielding sooner
			 * put a ~0.5 us syscall in the path of most completions.
			 */
			if (++empty > 1024 && !(empty & 31))
				sched_yield();
			continue;
		}
		empty = 0;
		now = now_ns();
		if (!stop && now >= deadline)
			stop = 1;
		for (k = 0; k < n; k++) {
			uint32_t *e = &cqes[k * 4];
			uint16_t cid = (uint16_t)e[3];
			uint16_t status = (uint16_t)(e[3] >> 17);

			if (cid >= b->qd || !busy[cid] || (e[2] >> 16) != q->qid) {
				b->bad_cqes++;
				continue;
			}
			if (status)
				b->errors++;
			busy[cid] = 0;
			outstanding--;
			b->ios++;
			if (b->lat_n < b->lat_cap)
				b->lat_ns[b->lat_n++] = (uint32_t)(now - t_sub[cid]);
			if (!stop) {
				fill_cmd(b, cmd, cid);
				t_sub[cid] = now;
				busy[cid] = 1;
				vg_submit(q, cmd, 0);
				outstanding++;
			}
		}
		if (!stop)
			vg_ring_sq(q);
		if (b->bad_cqes > 1000)
			break;
	}
	b->elapsed_s = (double)(now_ns() - t0) / 1e9;
	return 0;
}
