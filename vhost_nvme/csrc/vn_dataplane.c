// SPDX-License-Identifier: Apache-2.0
/*
 * The I/O data plane: one thread per worker polls the submission queues it
 * owns (a queue belongs to the worker of its completion queue, so a CQ is
 * only ever written by one thread), executes commands against the backing
 * descriptor and posts completions.  When idle for its poll window it
 * publishes EventIdx, re-checks, and sleeps on the kick eventfds.  The
 * window adapts (see poll_adapt) unless the controller fixes it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sched.h>
#include <sys/uio.h>
#include <unistd.h>

#include "vn_internal.h"

#define OPC_FLUSH	0x00
#define OPC_WRITE	0x01
#define OPC_READ	0x02
#define OPC_WRITE_ZEROES 0x08
#define OPC_DSM		0x09

int vn_worker_init(struct vn_worker *w)
{
	int i;

	w->epfd = -1;
	w->ring_efd = -1;
	w->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (w->wake_fd < 0)
		return -errno;
	if (io_uring_queue_init(VN_URING_DEPTH, &w->ring, 0) == 0) {
		w->ring_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
		if (w->ring_efd >= 0 && io_uring_register_eventfd(&w->ring, w->ring_efd) == 0)
			w->ring_ok = 1;
		else
			io_uring_queue_exit(&w->ring);
	}
	w->nfree = VN_URING_DEPTH;
	for (i = 0; i < VN_URING_DEPTH; i++)
		w->free_ids[i] = VN_URING_DEPTH - 1 - i;
	return 0;
}

void vn_worker_fini(struct vn_worker *w)
{
	if (w->ring_ok)
		io_uring_queue_exit(&w->ring);
	if (w->ring_efd >= 0)
		close(w->ring_efd);
	if (w->epfd >= 0)
		close(w->epfd);
	close(w->wake_fd);
}

static void mark_signal(struct vn_worker *w, struct vn_cq *cq)
{
	if (!cq->ien || w->vec_pass[cq->iv] == w->pass)
		return;
	w->vec_pass[cq->iv] = w->pass;
	w->sig[w->nsig++] = cq->iv;
}

static void flush_signals(struct vn_worker *w)
{
	int i;

	for (i = 0; i < w->nsig; i++)
		vn_signal_vector(w->c, w->sig[i]);
	w->st.signals += w->nsig;
	w->nsig = 0;
}

static void cq_post(struct vn_worker *w, struct vn_sq *sq, uint16_t cid, uint16_t status, uint32_t dw0)
{
	struct vn_cq *cq = sq->cq;
	uint32_t *e = (uint32_t *)(cq->ring + (size_t)cq->tail * 16);

	e[0] = dw0;
	e[1] = 0;
	e[2] = sq->head | ((uint32_t)sq->qid << 16);
	/* the phase bit goes last: it is what tells the guest the entry is valid */
	__atomic_store_n(&e[3], cid | ((uint32_t)cq->phase << 16) | ((uint32_t)status << 17),
			 __ATOMIC_RELEASE);
	if (++cq->tail == cq->size) {
		cq->tail = 0;
		cq->phase ^= 1;
	}
	cq->reserved--;
	w->st.cqes++;
	mark_signal(w, cq);
}

static int cq_used(struct vn_cq *cq)
{
	int used = (int)cq->tail - (int)cq->head;

	return (used < 0 ? used + cq->size : used) + cq->reserved;
}

static void cq_refresh_head(struct vn_worker *w, struct vn_cq *cq)
{
	uint32_t h = __atomic_load_n(cq->db, __ATOMIC_ACQUIRE);
	uint32_t posted = (cq->tail + cq->size - cq->head) % cq->size;

	/* the guest may only release entries that were posted */
	if (h >= cq->size || (h + cq->size - cq->head) % cq->size > posted) {
		if (h != cq->head)
			w->st.invalid_doorbells++;
		return;
	}
	cq->head = h;
}

static int cq_reserve(struct vn_worker *w, struct vn_cq *cq)
{
	if (cq_used(cq) + 1 < cq->size) {
		cq->reserved++;
		return 1;
	}
	cq_refresh_head(w, cq);
	if (cq_used(cq) + 1 < cq->size) {
		cq->reserved++;
		cq->waiting = 0;
		return 1;
	}
	cq->waiting = 1;
	return 0;
}

static int tb_take(struct vn_ns *ns, uint32_t bytes)
{
	uint64_t now;
	double dt;
	int ok = 1;

	pthread_spin_lock(&ns->tb_lock);
	now = vn_now_ns();
	dt = (double)(now - ns->tb_last_ns) / 1e9;
	ns->tb_last_ns = now;
	if (ns->iops.rate) {
		ns->iops.tokens += dt * ns->iops.rate;
		if (ns->iops.tokens > ns->iops.burst)
			ns->iops.tokens = ns->iops.burst;
		if (ns->iops.tokens < 1.0)
			ok = 0;
	}
	if (ns->bps.rate) {
		ns->bps.tokens += dt * ns->bps.rate;
		if (ns->bps.tokens > ns->bps.burst)
			ns->bps.tokens = ns->bps.burst;
		/* large commands may overdraw; they just delay the next ones */
		if (ns->bps.tokens <= 0)
			ok = 0;
	}
	if (ok) {
		if (ns->iops.rate)
			ns->iops.tokens -= 1.0;
		if (ns->bps.rate)
			ns->bps.tokens -= bytes;
	}
	pthread_spin_unlock(&ns->tb_lock);
	return ok;
}

static void consume(struct vn_sq *sq)
{
	if (++sq->head == sq->size)
		sq->head = 0;
}

static void complete(struct vn_worker *w, struct vn_sq *sq, struct vn_cmd *cmd, uint16_t status,
		     uint64_t lba)
{
	if (status) {
		if (cmd->nsid && cmd->nsid <= VN_MAX_NS)
			w->ns_st[cmd->nsid].errors++;
		vn_err_record(w->c, sq->qid, cmd->cid, status, cmd->nsid, lba);
	}
	cq_post(w, sq, cmd->cid, status, 0);
}

static uint16_t errno_status(int err)
{
	if (err == ENOSPC || err == EDQUOT)
		return VN_SC_CAP_EXCEEDED | VN_SC_DNR;
	return VN_SC_INTERNAL;
}

static void zero_tail(struct iovec *iov, int niov, size_t done)
{
	int i;

	for (i = 0; i < niov; i++) {
		if (done >= iov[i].iov_len) {
			done -= iov[i].iov_len;
			continue;
		}
		memset((uint8_t *)iov[i].iov_base + done, 0, iov[i].iov_len - done);
		done = 0;
	}
}

static uint16_t do_psync(struct vn_worker *w, struct vn_ns *ns, int is_write, int fua,
			 struct iovec *iov, int niov, off_t off, size_t len)
{
	ssize_t r;
	size_t done = 0;
	int flags = (fua || !__atomic_load_n(&w->c->wce, __ATOMIC_RELAXED)) ? RWF_DSYNC : 0;

	while (done < len) {
		struct iovec tmp[VN_MAX_IOV];
		int i, n = 0;
		size_t skip = done;

		for (i = 0; i < niov; i++) {
			if (skip >= iov[i].iov_len) {
				skip -= iov[i].iov_len;
				continue;
			}
			tmp[n].iov_base = (uint8_t *)iov[i].iov_base + skip;
			tmp[n].iov_len = iov[i].iov_len - skip;
			skip = 0;
			n++;
		}
		if (is_write)
			r = n == 1 && !flags ? pwrite(ns->fd, tmp[0].iov_base, tmp[0].iov_len, off + done)
					     : pwritev2(ns->fd, tmp, n, off + (off_t)done, flags);
		else
			r = n == 1 ? pread(ns->fd, tmp[0].iov_base, tmp[0].iov_len, off + done)
				   : preadv(ns->fd, tmp, n, off + (off_t)done);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return errno_status(errno);
		}
		if (r == 0) {
			if (is_write)
				return VN_SC_INTERNAL;
			/* backing file shorter than the namespace: reads past it are zeros */
			zero_tail(iov, niov, done);
			return 0;
		}
		done += (size_t)r;
	}
	return 0;
}

static int use_uring(struct vn_worker *w, struct vn_ns *ns, unsigned int batch)
{
	return w->ring_ok && w->nfree && ns->uring_min_batch && batch >= (unsigned int)ns->uring_min_batch;
}

static void submit_uring(struct vn_worker *w, struct vn_sq *sq, struct vn_cmd *cmd, struct vn_ns *ns,
			 int is_write, int fua, struct iovec *iov, int niov, off_t off, uint32_t len)
{
	int id = w->free_ids[--w->nfree];
	struct vn_req *r = &w->reqs[id];
	struct io_uring_sqe *sqe = io_uring_get_sqe(&w->ring);
	int flags = (fua || !__atomic_load_n(&w->c->wce, __ATOMIC_RELAXED)) ? RWF_DSYNC : 0;

	r->sq = sq;
	r->cid = cmd->cid;
	r->nsid = (uint16_t)cmd->nsid;
	r->is_write = (uint8_t)is_write;
	r->len = len;
	r->niov = niov;
	memcpy(r->iov, iov, sizeof(*iov) * niov);
	if (is_write)
		io_uring_prep_writev2(sqe, ns->fd, r->iov, niov, off, flags);
	else
		io_uring_prep_readv(sqe, ns->fd, r->iov, niov, off);
	io_uring_sqe_set_data(sqe, r);
	w->inflight++;
	w->to_submit++;
}

static int uring_reap(struct vn_worker *w)
{
	struct io_uring_cqe *cqe;
	int n = 0;

	while (io_uring_peek_cqe(&w->ring, &cqe) == 0) {
		struct vn_req *r = io_uring_cqe_get_data(cqe);
		uint16_t st = 0;
		int res = cqe->res;

		io_uring_cqe_seen(&w->ring, cqe);
		if (res < 0)
			st = errno_status(-res);
		else if ((uint32_t)res < r->len) {
			if (r->is_write)
				st = VN_SC_INTERNAL;
			else
				zero_tail(r->iov, r->niov, (size_t)res);
		}
		if (st) {
			w->ns_st[r->nsid].errors++;
			vn_err_record(w->c, r->sq->qid, r->cid, st, r->nsid, 0);
		}
		cq_post(w, r->sq, r->cid, st, 0);
		w->free_ids[w->nfree++] = (int)(r - w->reqs);
		w->inflight--;
		n++;
	}
	return n;
}

static int file_zero(struct vn_ns *ns, off_t off, off_t len, int dealloc)
{
	static const uint8_t zeros[VN_PAGE_SIZE];
	uint64_t range[2] = { (uint64_t)off, (uint64_t)len };

	if (ns->kind == VN_NS_BLOCK) {
		if (ioctl(ns->fd, dealloc ? BLKDISCARD : BLKZEROOUT, range) == 0)
			return 0;
		if (dealloc)
			return 0;	/* discard is advisory on block devices */
		return -errno;
	}
	if (!dealloc && fallocate(ns->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, off, len) == 0)
		return 0;
	if (fallocate(ns->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len) == 0)
		return 0;
	/* no hole punching here: write zeros so deallocated blocks still read back as zeros */
	while (len > 0) {
		size_t n = len > VN_PAGE_SIZE ? VN_PAGE_SIZE : (size_t)len;
		ssize_t r = pwrite(ns->fd, zeros, n, off);

		if (r <= 0)
			return r < 0 ? -errno : -EIO;
		off += r;
		len -= r;
	}
	return 0;
}

static int lba_ok(struct vn_ns *ns, uint64_t slba, uint64_t nlb)
{
	return slba < ns->nblocks && nlb <= ns->nblocks - slba;
}

/* Returns 0 when throttled (command left in the queue), 1 when consumed. */
static int io_cmd(struct vn_worker *w, struct vn_sq *sq, struct vn_cmd *cmd, unsigned int batch)
{
	struct vn_ctrl *c = w->c;
	struct vn_ns_stats *nst;
	struct vn_ns *ns;
	struct iovec iov[VN_MAX_IOV];
	uint64_t slba = cmd->cdw10 | ((uint64_t)cmd->cdw11 << 32);
	uint32_t nlb = (cmd->cdw12 & 0xffff) + 1, len = 0;
	int is_write = cmd->opc == OPC_WRITE, fua = !!(cmd->cdw12 & (1u << 30)), niov, i;
	uint16_t st;

	if (cmd->flags & 0xc3) {	/* FUSE or PSDT (SGL) set: we only do PRP, unfused */
		consume(sq);
		complete(w, sq, cmd, VN_SC_INVALID_FIELD | VN_SC_DNR, 0);
		return 1;
	}
	if (cmd->opc == OPC_FLUSH && cmd->nsid == 0xffffffffu) {
		consume(sq);
		st = 0;
		for (i = 1; i <= VN_MAX_NS; i++)
			if (c->ns[i] && c->ns[i]->fd >= 0 && fdatasync(c->ns[i]->fd) < 0)
				st = VN_SC_INTERNAL;
		complete(w, sq, cmd, st, 0);
		return 1;
	}
	ns = cmd->nsid && cmd->nsid <= VN_MAX_NS ? c->ns[cmd->nsid] : NULL;
	if (!ns) {
		consume(sq);
		complete(w, sq, cmd, VN_SC_INVALID_NS | VN_SC_DNR, 0);
		return 1;
	}
	nst = &w->ns_st[cmd->nsid];
	switch (cmd->opc) {
	case OPC_READ:
	case OPC_WRITE:
		if (!lba_ok(ns, slba, nlb)) {
			consume(sq);
			complete(w, sq, cmd, VN_SC_LBA_RANGE | VN_SC_DNR, slba);
			return 1;
		}
		if ((uint64_t)nlb << ns->lba_shift > VN_MAX_XFER) {
			consume(sq);
			complete(w, sq, cmd, VN_SC_INVALID_FIELD | VN_SC_DNR, slba);
			return 1;
		}
		len = nlb << ns->lba_shift;
		if (is_write && ns->ro) {
			consume(sq);
			complete(w, sq, cmd, VN_SC_NS_WRITE_PROT | VN_SC_DNR, slba);
			return 1;
		}
		if (ns->limited && !tb_take(ns, len)) {
			nst->throttled++;
			return 0;
		}
		consume(sq);
		st = vn_prp_map(c, cmd->prp1, cmd->prp2, len, iov, &niov);
		if (st) {
			complete(w, sq, cmd, st, slba);
			return 1;
		}
		if (is_write) {
			nst->writes++;
			nst->write_bytes += len;
		} else {
			nst->reads++;
			nst->read_bytes += len;
		}
		if (ns->kind == VN_NS_NULL) {
			cq_post(w, sq, cmd->cid, 0, 0);
			return 1;
		}
		if (use_uring(w, ns, batch)) {
			nst->uring_ios++;
			submit_uring(w, sq, cmd, ns, is_write, fua, iov, niov,
				     (off_t)(slba << ns->lba_shift), len);
			return 1;
		}
		nst->psync_ios++;
		st = do_psync(w, ns, is_write, fua, iov, niov, (off_t)(slba << ns->lba_shift), len);
		complete(w, sq, cmd, st, slba);
		return 1;
	case OPC_FLUSH:
		consume(sq);
		nst->others++;
		st = ns->fd >= 0 && fdatasync(ns->fd) < 0 ? VN_SC_INTERNAL : 0;
		complete(w, sq, cmd, st, 0);
		return 1;
	case OPC_WRITE_ZEROES:
		consume(sq);
		nst->others++;
		if (!lba_ok(ns, slba, nlb))
			st = VN_SC_LBA_RANGE | VN_SC_DNR;
		else if (ns->ro)
			st = VN_SC_NS_WRITE_PROT | VN_SC_DNR;
		else if (ns->kind == VN_NS_NULL)
			st = 0;
		else
			st = file_zero(ns, (off_t)(slba << ns->lba_shift), (off_t)nlb << ns->lba_shift,
				       0) ? VN_SC_INTERNAL : 0;
		complete(w, sq, cmd, st, slba);
		return 1;
	case OPC_DSM: {
		uint32_t nr = (cmd->cdw10 & 0xff) + 1;
		uint32_t ranges[256 * 4];

		consume(sq);
		nst->others++;
		st = vn_prp_copy(c, cmd->prp1, cmd->prp2, ranges, nr * 16, 0);
		if (!st && (cmd->cdw11 & 4)) {	/* AD: deallocate */
			if (ns->ro)
				st = VN_SC_NS_WRITE_PROT | VN_SC_DNR;
			for (i = 0; !st && i < (int)nr; i++) {
				uint64_t s = ranges[i * 4 + 2] | ((uint64_t)ranges[i * 4 + 3] << 32);

				if (!lba_ok(ns, s, ranges[i * 4 + 1]))
					st = VN_SC_LBA_RANGE | VN_SC_DNR;
			}
			for (i = 0; !st && i < (int)nr && ns->kind != VN_NS_NULL; i++) {
				uint64_t s = ranges[i * 4 + 2] | ((uint64_t)ranges[i * 4 + 3] << 32);
				uint64_t n = ranges[i * 4 + 1];

				if (n && file_zero(ns, (off_t)(s << ns->lba_shift), (off_t)(n << ns->lba_shift), 1))
					st = VN_SC_INTERNAL;
			}
		}
		complete(w, sq, cmd, st, 0);
		return 1;
	}
	default:
		consume(sq);
		complete(w, sq, cmd, VN_SC_INVALID_OPCODE | VN_SC_DNR, 0);
		return 1;
	}
}

static int sq_process(struct vn_worker *w, struct vn_sq *sq)
{
	uint32_t tail = __atomic_load_n(sq->db, __ATOMIC_ACQUIRE);
	unsigned int batch;
	struct vn_cmd cmd;
	int n = 0;

	if (tail == sq->head)
		return 0;
	if (tail >= sq->size) {
		if (!sq->bad_db) {
			sq->bad_db = 1;
			w->st.invalid_doorbells++;
			vn_err_record(w->c, sq->qid, 0xffff, VN_SC_INVALID_FIELD, 0, tail);
		}
		return 0;
	}
	batch = (tail + sq->size - sq->head) % sq->size;
	while (sq->head != tail && n < VN_SQ_BUDGET) {
		if (!cq_reserve(w, sq->cq))
			break;
		memcpy(&cmd, sq->ring + (size_t)sq->head * 64, sizeof(cmd));
		if (!io_cmd(w, sq, &cmd, batch)) {
			sq->cq->reserved--;
			w->throttled = 1;
			break;
		}
		n++;
	}
	return n;
}

/*
 * Before sleeping: ask the guest to ring for anything past what we have seen,
 * then look once more, because a submission may have slipped in between our
 * last poll and the EventIdx store.
 */
static int arm_and_recheck(struct vn_worker *w)
{
	int i;

	for (i = 0; i < w->nsq; i++)
		if (w->sqs[i]->ei)
			__atomic_store_n(w->sqs[i]->ei, w->sqs[i]->head, __ATOMIC_RELAXED);
	for (i = 0; i < w->ncq; i++)
		if (w->cqs[i]->ei && w->cqs[i]->waiting)
			__atomic_store_n(w->cqs[i]->ei, w->cqs[i]->head, __ATOMIC_RELAXED);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	for (i = 0; i < w->nsq; i++) {
		struct vn_sq *sq = w->sqs[i];
		uint32_t t = __atomic_load_n(sq->db, __ATOMIC_ACQUIRE);

		if (t != sq->head && !sq->bad_db && (!sq->cq->waiting))
			return 1;
	}
	for (i = 0; i < w->ncq; i++) {
		struct vn_cq *cq = w->cqs[i];

		if (cq->waiting && __atomic_load_n(cq->db, __ATOMIC_ACQUIRE) != cq->head)
			return 1;
	}
	return 0;
}

static void ep_add(struct vn_worker *w, int fd)
{
	struct epoll_event ev = { .events = EPOLLIN, .data.fd = fd };

	if (fd >= 0)
		epoll_ctl(w->epfd, EPOLL_CTL_ADD, fd, &ev);	/* EEXIST for shared kick fds is fine */
}

static void worker_rebuild(struct vn_worker *w)
{
	struct vn_ctrl *c = w->c;
	int q;

	if (w->epfd >= 0)
		close(w->epfd);
	w->epfd = epoll_create1(EPOLL_CLOEXEC);
	ep_add(w, w->wake_fd);
	if (w->ring_ok)
		ep_add(w, w->ring_efd);
	w->nsq = 0;
	w->ncq = 0;
	for (q = 1; q < VN_MAX_QID; q++) {
		if (c->cq[q].active && c->cq[q].worker == w->id) {
			w->cqs[w->ncq++] = &c->cq[q];
			ep_add(w, c->kick_fd[q]);
		}
		if (c->sq[q].active && c->cq[c->sq[q].cqid].worker == w->id) {
			w->sqs[w->nsq++] = &c->sq[q];
			ep_add(w, c->kick_fd[q]);
		}
	}
}

/* Finish everything in flight so queues and memory can change under a pause. */
static void worker_quiesce(struct vn_worker *w)
{
	struct io_uring_cqe *cqe;

	if (!w->ring_ok)
		return;
	if (w->to_submit) {
		io_uring_submit(&w->ring);
		w->to_submit = 0;
	}
	while (w->inflight) {
		if (io_uring_wait_cqe(&w->ring, &cqe) < 0)
			break;
		uring_reap(w);
	}
	flush_signals(w);
}

/*
 * The poll window decides between two costs: spinning (a core) and sleeping
 * (with EventIdx armed the guest's next doorbell traps, and the wake-up adds
 * its latency to that command).  After a sleep that a kick ended with work,
 * gap is the time from the last work to that kick.  A gap within the cap
 * means a longer window would have caught the submission without a trap:
 * grow to 1.5x the gap, at most doubling per wake-up so that one odd gap
 * does not pin the window at the cap.  A gap beyond the cap means sleeping
 * was right, but one such gap says little: a TCG guest (or any guest on a
 * busy host) mixes short gaps between commands with long ones between
 * processes, and shrinking on each long gap lost the window the short gaps
 * had earned, one trap per loss.  So the window shrinks (by an eighth per
 * wake-up, down to the floor) only once VN_POLL_IDLE_WAKES wake-ups in a row
 * found long gaps.  Idle CPU stays bounded: with nothing arriving the worker
 * sleeps after one window, and a guest slower than the cap costs at most
 * VN_POLL_IDLE_WAKES windows before the window walks down geometrically.
 */
static void poll_adapt(struct vn_worker *w, uint64_t gap)
{
	struct vn_ctrl *c = w->c;
	uint64_t win = w->window_ns, want;
	uint64_t floor = c->poll_ns < VN_POLL_MIN_NS ? c->poll_ns : VN_POLL_MIN_NS;

	if (!c->poll_adaptive)
		return;
	if (gap <= c->poll_ns) {
		w->long_gaps = 0;
		want = gap + gap / 2;
		if (want > 2 * win)
			want = 2 * win;
		if (want > win)
			win = want;
	} else if (++w->long_gaps >= VN_POLL_IDLE_WAKES) {
		win -= win / 8;
	}
	if (win < floor)
		win = floor;
	if (win > c->poll_ns)
		win = c->poll_ns;
	__atomic_store_n(&w->window_ns, win, __ATOMIC_RELAXED);
}

static void poll_reset(struct vn_worker *w)
{
	struct vn_ctrl *c = w->c;
	uint64_t win = c->poll_ns;

	if (c->poll_adaptive && win > VN_POLL_START_NS)
		win = VN_POLL_START_NS;
	w->long_gaps = 0;
	__atomic_store_n(&w->window_ns, win, __ATOMIC_RELAXED);
}

/* Idle spins between clock reads: a vDSO clock_gettime costs as much as a dozen empty polls. */
#define VN_CLOCK_EVERY		16
/*
 * Spin this long without work before yielding the core on every clock read.
 * sched_yield is a ~0.5 us syscall here; yielding every few polls (as before)
 * put it in the path of most QD1 commands while the guest, on its own core,
 * was about to submit.  Past this point the guest is evidently not running
 * alongside, and whatever shares our core may be what we wait for.
 */
#define VN_YIELD_AFTER_NS	5000

void *vn_worker_main(void *arg)
{
	struct vn_worker *w = arg;
	struct vn_ctrl *c = w->c;
	struct epoll_event evs[16];
	uint64_t idle_since = 0, now, cnt, woke_gap = 0;
	unsigned int spins = 0;
	int i, n, work, kicked;

	poll_reset(w);
	for (;;) {
		if (__atomic_load_n(&c->pause_req, __ATOMIC_ACQUIRE)) {
			worker_quiesce(w);
			pthread_mutex_lock(&c->lock);
			c->paused++;
			pthread_cond_broadcast(&c->cond);
			while (c->pause_req && !c->stopping)
				vn_cond_wait_briefly(&c->cond, &c->lock);
			c->paused--;
			pthread_mutex_unlock(&c->lock);
			if (c->stopping)
				break;
			worker_rebuild(w);
			poll_reset(w);
			idle_since = 0;
			woke_gap = 0;
			continue;
		}
		w->pass++;
		w->throttled = 0;
		work = 0;
		for (i = 0; i < w->nsq; i++)
			work += sq_process(w, w->sqs[i]);
		if (w->to_submit) {
			io_uring_submit(&w->ring);
			w->to_submit = 0;
		}
		if (w->inflight)
			work += uring_reap(w);
		if (w->nsig)
			flush_signals(w);
		if (work) {
			if (woke_gap) {
				poll_adapt(w, woke_gap);
				woke_gap = 0;
			}
			/* the window counts from the last work, not from the first idle pass */
			idle_since = 0;
			spins = 0;
			continue;
		}
		w->st.polls++;
		if (woke_gap) {
			woke_gap = 0;	/* woken, but nothing to do: a stale kick says nothing about gaps */
			spins = 0;
		}
		/*
		 * The idle clock starts at the first read, VN_CLOCK_EVERY
		 * spins after the last work: reading it right away would put
		 * a clock read just where the guest's next doorbell lands.
		 */
		if (++spins % VN_CLOCK_EVERY)
			continue;
		now = vn_now_ns();
		if (!idle_since) {
			idle_since = now;
			continue;
		}
		if (now - idle_since < __atomic_load_n(&w->window_ns, __ATOMIC_RELAXED)) {
			/*
			 * On a shared core the guest (or anything else) may be
			 * what we are waiting for: let it run instead of
			 * spinning out our time slice.
			 */
			if (now - idle_since >= VN_YIELD_AFTER_NS)
				sched_yield();
			continue;
		}
		if (!w->throttled && arm_and_recheck(w))
			continue;
		w->st.sleeps++;
		n = epoll_wait(w->epfd, evs, 16, w->throttled ? 1 : -1);
		kicked = 0;
		for (i = 0; i < n; i++) {
			if (read(evs[i].data.fd, &cnt, sizeof(cnt)) == sizeof(cnt) &&
			    evs[i].data.fd != w->wake_fd && evs[i].data.fd != w->ring_efd) {
				w->st.kicks += cnt;
				kicked = 1;
			}
		}
		if (kicked)
			woke_gap = vn_now_ns() - idle_since;
		idle_since = 0;
	}
	return NULL;
}
