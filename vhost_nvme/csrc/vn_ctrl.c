// SPDX-License-Identifier: Apache-2.0
/*
 * Controller-wide configuration.  Every function that changes what the
 * workers look at (queues, memory, fds, namespaces) must be called while
 * the workers are paused; the Python control plane guarantees that, which
 * keeps the hot path free of locks.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "vn_internal.h"

uint64_t vn_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/*
 * Every wait on c->cond re-checks its predicate at least every 50 ms.  A
 * pause/stop once hung for good with the worker blocked in pthread_cond_wait
 * although stopping was set and broadcast under the lock (seen on a heavily
 * loaded host, glibc 2.36; consistent with glibc bug 25847, lost condvar wake-ups
 * that were only fixed in 2.41).  A bounded wait turns such a loss into a
 * short delay on a control-plane path.
 */
void vn_cond_wait_briefly(pthread_cond_t *cond, pthread_mutex_t *lock)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_nsec += 50 * 1000 * 1000;
	if (ts.tv_nsec >= 1000000000L) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000L;
	}
	pthread_cond_timedwait(cond, lock, &ts);
}

struct vn_ctrl *vn_ctrl_new(int nworkers, unsigned int poll_us)
{
	struct vn_ctrl *c;
	int i;

	if (nworkers < 1 || nworkers > VN_MAX_WORKERS)
		return NULL;
	c = calloc(1, sizeof(*c));
	if (!c)
		return NULL;
	c->nworkers = nworkers;
	c->poll_ns = (uint64_t)poll_us * 1000;
	c->poll_adaptive = 1;
	c->wce = 1;
	pthread_mutex_init(&c->lock, NULL);
	pthread_cond_init(&c->cond, NULL);
	pthread_mutex_init(&c->err_lock, NULL);
	for (i = 0; i < VN_MAX_QID; i++)
		c->kick_fd[i] = VN_NO_FD;
	for (i = 0; i < VN_MAX_VECTORS; i++)
		c->call_fd[i] = VN_NO_FD;
	/* Until the front-end supplies its mirror page, register writes land here. */
	c->mirror = mmap(NULL, VN_PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (c->mirror == MAP_FAILED) {
		free(c);
		return NULL;
	}
	for (i = 0; i < nworkers; i++) {
		c->w[i] = calloc(1, sizeof(struct vn_worker));
		if (!c->w[i])
			goto fail;
		c->w[i]->c = c;
		c->w[i]->id = i;
		if (vn_worker_init(c->w[i]) < 0) {
			free(c->w[i]);
			c->w[i] = NULL;
			goto fail;
		}
	}
	/* Workers start paused so configuration never races them. */
	c->pause_req = 1;
	return c;
fail:
	vn_ctrl_free(c);
	return NULL;
}

/* Call while paused (the workers pick the window up when they resume). */
void vn_ctrl_set_poll(struct vn_ctrl *c, unsigned int poll_us, int adaptive)
{
	c->poll_ns = (uint64_t)poll_us * 1000;
	c->poll_adaptive = !!adaptive;
}

void vn_ctrl_free(struct vn_ctrl *c)
{
	int i;

	if (!c)
		return;
	if (c->started) {
		pthread_mutex_lock(&c->lock);
		c->stopping = 1;
		c->pause_req = 1;
		pthread_cond_broadcast(&c->cond);
		pthread_mutex_unlock(&c->lock);
		for (i = 0; i < c->nworkers; i++) {
			uint64_t one = 1;

			if (write(c->w[i]->wake_fd, &one, sizeof(one)) < 0) {
				/* eventfd write cannot fail short of overflow */
			}
		}
		for (i = 0; i < c->nworkers; i++)
			pthread_join(c->w[i]->thr, NULL);
	}
	for (i = 0; i < c->nworkers; i++) {
		if (c->w[i]) {
			vn_worker_fini(c->w[i]);
			free(c->w[i]);
		}
	}
	for (i = 1; i <= VN_MAX_NS; i++)
		vn_ns_detach(c, i);
	for (i = 0; i < VN_MAX_QID; i++)
		if (c->kick_fd[i] >= 0)
			close(c->kick_fd[i]);
	for (i = 0; i < VN_MAX_VECTORS; i++)
		if (c->call_fd[i] >= 0)
			close(c->call_fd[i]);
	vn_mem_clear(c);
	munmap(c->mirror, VN_PAGE_SIZE);
	free(c);
}

int vn_ctrl_start(struct vn_ctrl *c)
{
	int i, rc;

	if (c->started)
		return 0;
	for (i = 0; i < c->nworkers; i++) {
		rc = pthread_create(&c->w[i]->thr, NULL, vn_worker_main, c->w[i]);
		if (rc)
			return -rc;
		c->started++;
	}
	/* wait until every worker sits in the pause barrier */
	pthread_mutex_lock(&c->lock);
	while (c->paused < c->nworkers)
		vn_cond_wait_briefly(&c->cond, &c->lock);
	pthread_mutex_unlock(&c->lock);
	return 0;
}

void vn_ctrl_pause(struct vn_ctrl *c)
{
	uint64_t one = 1;
	int i;

	pthread_mutex_lock(&c->lock);
	__atomic_store_n(&c->pause_req, 1, __ATOMIC_RELEASE);
	pthread_mutex_unlock(&c->lock);
	if (!c->started)
		return;
	for (i = 0; i < c->nworkers; i++)
		if (write(c->w[i]->wake_fd, &one, sizeof(one)) < 0) {
			/* cannot fail */
		}
	pthread_mutex_lock(&c->lock);
	while (c->paused < c->nworkers)
		vn_cond_wait_briefly(&c->cond, &c->lock);
	pthread_mutex_unlock(&c->lock);
}

void vn_ctrl_resume(struct vn_ctrl *c)
{
	pthread_mutex_lock(&c->lock);
	__atomic_store_n(&c->pause_req, 0, __ATOMIC_RELEASE);
	pthread_cond_broadcast(&c->cond);
	pthread_mutex_unlock(&c->lock);
}

void vn_ctrl_get_stats(struct vn_ctrl *c, struct vn_ctrl_stats *out)
{
	int i;

	*out = c->admin_st;
	for (i = 0; i < c->nworkers; i++) {
		struct vn_ctrl_stats *s = &c->w[i]->st;

		out->cqes += s->cqes;
		out->signals += s->signals;
		out->kicks += s->kicks;
		out->sleeps += s->sleeps;
		out->polls += s->polls;
		out->invalid_doorbells += s->invalid_doorbells;
		if (__atomic_load_n(&c->w[i]->window_ns, __ATOMIC_RELAXED) > out->poll_window_ns)
			out->poll_window_ns = __atomic_load_n(&c->w[i]->window_ns, __ATOMIC_RELAXED);
	}
}

void vn_err_record(struct vn_ctrl *c, uint16_t sqid, uint16_t cid, uint16_t status, uint32_t nsid, uint64_t lba)
{
	struct vn_err *e;

	pthread_mutex_lock(&c->err_lock);
	e = &c->errs[c->err_head];
	memset(e, 0, sizeof(*e));
	e->sqid = sqid;
	e->cid = cid;
	e->status = status;
	e->nsid = nsid;
	e->lba = lba;
	c->err_head = (c->err_head + 1) % VN_ERR_RING;
	if (c->err_count < VN_ERR_RING)
		c->err_count++;
	pthread_mutex_unlock(&c->err_lock);
}

int vn_err_pop(struct vn_ctrl *c, struct vn_err *out)
{
	int idx, got = 0;

	pthread_mutex_lock(&c->err_lock);
	if (c->err_count) {
		idx = (c->err_head - c->err_count + VN_ERR_RING) % VN_ERR_RING;
		*out = c->errs[idx];
		c->err_count--;
		got = 1;
	}
	pthread_mutex_unlock(&c->err_lock);
	return got;
}

void vn_set_wce(struct vn_ctrl *c, int on)
{
	__atomic_store_n(&c->wce, !!on, __ATOMIC_RELAXED);
}

int vn_set_db_mirror(struct vn_ctrl *c, int fd, uint64_t offset)
{
	uint8_t *p;

	if (offset & (VN_PAGE_SIZE - 1))
		return -EINVAL;
	p = mmap(NULL, VN_PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)offset);
	if (p == MAP_FAILED)
		return -errno;
	memcpy(p, c->mirror, VN_PAGE_SIZE);
	munmap(c->mirror, VN_PAGE_SIZE);
	c->mirror = p;
	/* re-point doorbells of existing queues */
	for (int q = 0; q < VN_MAX_QID; q++) {
		if (c->sq[q].active && (!c->dbbuf_on || q == 0))
			c->sq[q].db = (volatile uint32_t *)(p + q * 8);
		if (c->cq[q].active && (!c->dbbuf_on || q == 0))
			c->cq[q].db = (volatile uint32_t *)(p + q * 8 + 4);
	}
	return 0;
}

uint32_t vn_db_mirror_read(struct vn_ctrl *c, unsigned int slot)
{
	if (slot >= VN_PAGE_SIZE / 4)
		return 0;
	return __atomic_load_n((uint32_t *)(c->mirror + slot * 4), __ATOMIC_ACQUIRE);
}

void vn_db_mirror_write(struct vn_ctrl *c, unsigned int slot, uint32_t val)
{
	if (slot < VN_PAGE_SIZE / 4)
		__atomic_store_n((uint32_t *)(c->mirror + slot * 4), val, __ATOMIC_RELEASE);
}

static int replace_fd(int *slot, int fd)
{
	int nfd = VN_NO_FD;

	if (fd >= 0) {
		nfd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
		if (nfd < 0)
			return -errno;
	}
	if (*slot >= 0)
		close(*slot);
	*slot = nfd;
	return 0;
}

int vn_set_kick(struct vn_ctrl *c, unsigned int qid, int fd)
{
	if (qid >= VN_MAX_QID)
		return -EINVAL;
	return replace_fd(&c->kick_fd[qid], fd);
}

int vn_set_call(struct vn_ctrl *c, unsigned int vector, int fd)
{
	if (vector >= VN_MAX_VECTORS)
		return -EINVAL;
	return replace_fd(&c->call_fd[vector], fd);
}

void vn_signal_vector(struct vn_ctrl *c, unsigned int vector)
{
	uint64_t one = 1;

	if (vector < VN_MAX_VECTORS && c->call_fd[vector] >= 0) {
		if (write(c->call_fd[vector], &one, sizeof(one)) < 0) {
			/* counter overflow only: the front-end is not reading */
		}
	}
}

/* A doorbell written through REG_WRITE (no kick fd involved): wake the owning worker. */
void vn_doorbell_wake(struct vn_ctrl *c, unsigned int qid)
{
	uint64_t one = 1;

	int i;

	if (!qid || qid >= VN_MAX_QID || !c->started)
		return;
	for (i = 0; i < c->nworkers; i++)
		if (write(c->w[i]->wake_fd, &one, sizeof(one)) < 0) {
			/* cannot fail */
		}
}

static volatile uint32_t *db_slot(struct vn_ctrl *c, unsigned int qid, int is_cq)
{
	unsigned int off = qid * 8 + (is_cq ? 4 : 0);

	if (c->dbbuf_on && qid)
		return (volatile uint32_t *)(c->shadow + off);
	return (volatile uint32_t *)(c->mirror + off);
}

static volatile uint32_t *ei_slot(struct vn_ctrl *c, unsigned int qid, int is_cq)
{
	if (!c->dbbuf_on || !qid)
		return NULL;
	return (volatile uint32_t *)(c->eventidx + qid * 8 + (is_cq ? 4 : 0));
}

int vn_cq_create(struct vn_ctrl *c, unsigned int qid, uint64_t gpa, unsigned int size, unsigned int iv, int ien)
{
	struct vn_cq *cq;
	uint8_t *ring;

	if (qid >= VN_MAX_QID || size < 2 || size > VN_MQES + 1 || iv >= VN_MAX_VECTORS)
		return -EINVAL;
	ring = vn_gpa(c, gpa, (uint64_t)size * 16);
	if (!ring)
		return -EFAULT;
	cq = &c->cq[qid];
	memset(cq, 0, sizeof(*cq));
	cq->qid = qid;
	cq->size = size;
	cq->phase = 1;
	cq->iv = iv;
	cq->ien = !!ien;
	cq->gpa = gpa;
	cq->ring = ring;
	cq->worker = qid % c->nworkers;
	cq->db = db_slot(c, qid, 1);
	cq->ei = ei_slot(c, qid, 1);
	*cq->db = 0;
	cq->active = 1;
	return 0;
}

int vn_sq_create(struct vn_ctrl *c, unsigned int qid, uint64_t gpa, unsigned int size, unsigned int cqid)
{
	struct vn_sq *sq;
	uint8_t *ring;

	if (qid >= VN_MAX_QID || cqid >= VN_MAX_QID || !c->cq[cqid].active ||
	    size < 2 || size > VN_MQES + 1)
		return -EINVAL;
	ring = vn_gpa(c, gpa, (uint64_t)size * 64);
	if (!ring)
		return -EFAULT;
	sq = &c->sq[qid];
	memset(sq, 0, sizeof(*sq));
	sq->qid = qid;
	sq->size = size;
	sq->cqid = cqid;
	sq->gpa = gpa;
	sq->ring = ring;
	sq->cq = &c->cq[cqid];
	sq->db = db_slot(c, qid, 0);
	sq->ei = ei_slot(c, qid, 0);
	*sq->db = 0;
	sq->active = 1;
	return 0;
}

void vn_sq_delete(struct vn_ctrl *c, unsigned int qid)
{
	if (qid < VN_MAX_QID)
		c->sq[qid].active = 0;
}

void vn_cq_delete(struct vn_ctrl *c, unsigned int qid)
{
	if (qid < VN_MAX_QID)
		c->cq[qid].active = 0;
}

/* Admin queue access for the Python control plane (qid 0 is never shadowed). */
int vn_sq_fetch(struct vn_ctrl *c, unsigned int qid, void *sqe)
{
	struct vn_sq *sq;
	uint32_t tail;

	if (qid >= VN_MAX_QID || !c->sq[qid].active)
		return -EINVAL;
	sq = &c->sq[qid];
	tail = __atomic_load_n(sq->db, __ATOMIC_ACQUIRE);
	if (tail >= sq->size) {
		if (!sq->bad_db) {
			sq->bad_db = 1;
			c->admin_st.invalid_doorbells++;
		}
		return -ERANGE;
	}
	if (tail == sq->head)
		return 0;
	memcpy(sqe, sq->ring + (size_t)sq->head * 64, 64);
	sq->head = (sq->head + 1) % sq->size;
	return 1;
}

int vn_cq_post(struct vn_ctrl *c, unsigned int cqid, unsigned int sqid, uint16_t cid, uint16_t status, uint32_t dw0)
{
	struct vn_cq *cq;
	uint32_t *e, head, used;

	if (cqid >= VN_MAX_QID || sqid >= VN_MAX_QID || !c->cq[cqid].active)
		return -EINVAL;
	cq = &c->cq[cqid];
	head = __atomic_load_n(cq->db, __ATOMIC_ACQUIRE);
	if (head < cq->size)
		cq->head = head;
	used = (cq->tail + cq->size - cq->head) % cq->size;
	if (used + 1 >= cq->size)
		return -EAGAIN;
	e = (uint32_t *)(cq->ring + (size_t)cq->tail * 16);
	e[0] = dw0;
	e[1] = 0;
	e[2] = c->sq[sqid].head | ((uint32_t)sqid << 16);
	__atomic_store_n(&e[3], cid | ((uint32_t)cq->phase << 16) | ((uint32_t)status << 17),
			 __ATOMIC_RELEASE);
	if (++cq->tail == cq->size) {
		cq->tail = 0;
		cq->phase ^= 1;
	}
	c->admin_st.cqes++;
	if (cq->ien) {
		vn_signal_vector(c, cq->iv);
		c->admin_st.signals++;
	}
	return 0;
}

/*
 * Doorbell Buffer Config: from now on I/O queue doorbells are read from the
 * guest's shadow page.  The current values are copied in first so a guest
 * that configures the buffer after creating queues (Linux does) loses nothing.
 */
int vn_dbbuf_set(struct vn_ctrl *c, uint64_t shadow_gpa, uint64_t ei_gpa)
{
	uint8_t *sh = vn_gpa(c, shadow_gpa, VN_PAGE_SIZE);
	uint8_t *ei = vn_gpa(c, ei_gpa, VN_PAGE_SIZE);
	int q;

	if (!sh || !ei)
		return -EFAULT;
	c->shadow = sh;
	c->eventidx = ei;
	c->dbbuf_on = 1;
	for (q = 1; q < VN_MAX_QID; q++) {
		if (c->sq[q].active) {
			uint32_t v = *c->sq[q].db;

			c->sq[q].db = db_slot(c, q, 0);
			c->sq[q].ei = ei_slot(c, q, 0);
			*c->sq[q].db = v;
			*c->sq[q].ei = v;
		}
		if (c->cq[q].active) {
			uint32_t v = *c->cq[q].db;

			c->cq[q].db = db_slot(c, q, 1);
			c->cq[q].ei = ei_slot(c, q, 1);
			*c->cq[q].db = v;
			*c->cq[q].ei = v;
		}
	}
	return 0;
}

void vn_dbbuf_clear(struct vn_ctrl *c)
{
	int q;

	c->dbbuf_on = 0;
	c->shadow = NULL;
	c->eventidx = NULL;
	for (q = 0; q < VN_MAX_QID; q++) {
		c->sq[q].db = db_slot(c, q, 0);
		c->sq[q].ei = NULL;
		c->cq[q].db = db_slot(c, q, 1);
		c->cq[q].ei = NULL;
	}
}
