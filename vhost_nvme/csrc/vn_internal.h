/* SPDX-License-Identifier: Apache-2.0 */
#ifndef VN_INTERNAL_H
#define VN_INTERNAL_H

#include <pthread.h>
#include <stdint.h>
#include <sys/uio.h>
#include <liburing.h>

#include "vn_engine.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "vhost_nvme assumes a little-endian host (NVMe structures are little-endian)"
#endif

#define VN_URING_DEPTH		128
#define VN_SQ_BUDGET		64
#define VN_NO_FD		(-1)
#define VN_POLL_MIN_NS		10000ull	/* adaptive window floor */
#define VN_POLL_START_NS	50000ull	/* adaptive window after start and resume */
#define VN_POLL_IDLE_WAKES	16		/* long gaps in a row before the window shrinks */

struct vn_region {
	uint64_t gpa;
	uint64_t size;
	uint8_t *hva;
};

struct vn_cq {
	int active;
	uint16_t qid;
	uint16_t size;
	uint16_t tail;
	uint16_t head;
	uint8_t phase;
	uint8_t ien;
	uint8_t waiting;	/* full: wants a head doorbell kick */
	uint16_t iv;
	int reserved;		/* slots promised to fetched, uncompleted commands */
	int worker;
	uint64_t gpa;
	uint8_t *ring;
	volatile uint32_t *db;
	volatile uint32_t *ei;
};

struct vn_sq {
	int active;
	uint16_t qid;
	uint16_t size;
	uint16_t head;
	uint16_t cqid;
	uint8_t bad_db;
	uint64_t gpa;
	uint8_t *ring;
	struct vn_cq *cq;
	volatile uint32_t *db;
	volatile uint32_t *ei;
};

struct vn_tb {
	double rate;		/* tokens per second; 0 = unlimited */
	double burst;
	double tokens;
};

struct vn_ns {
	int fd;
	int kind;
	int ro;
	int policy;
	int uring_min_batch;
	unsigned int lba_shift;
	uint64_t nblocks;
	int limited;
	pthread_spinlock_t tb_lock;
	uint64_t tb_last_ns;
	struct vn_tb iops;
	struct vn_tb bps;
};

struct vn_req {
	struct vn_sq *sq;
	uint16_t cid;
	uint16_t nsid;
	uint8_t is_write;
	uint32_t len;
	int niov;
	struct iovec iov[VN_MAX_IOV];
};

struct vn_worker {
	struct vn_ctrl *c;
	int id;
	pthread_t thr;
	int wake_fd;
	int epfd;
	struct io_uring ring;
	int ring_ok;
	int ring_efd;
	int inflight;
	int to_submit;
	int nfree;
	int free_ids[VN_URING_DEPTH];
	struct vn_req reqs[VN_URING_DEPTH];
	int nsq;
	struct vn_sq *sqs[VN_MAX_QID];
	int ncq;
	struct vn_cq *cqs[VN_MAX_QID];
	uint32_t pass;
	uint32_t vec_pass[VN_MAX_VECTORS];
	int nsig;
	uint16_t sig[VN_MAX_VECTORS];
	int throttled;
	uint64_t window_ns;	/* busy-poll this long after the last work before sleeping */
	unsigned int long_gaps;	/* wake-ups in a row that came after more than the cap */
	struct vn_ctrl_stats st;
	struct vn_ns_stats ns_st[VN_MAX_NS + 1];
};

struct vn_ctrl {
	int nworkers;
	uint64_t poll_ns;	/* adaptive: the window's cap; fixed: the window */
	int poll_adaptive;
	struct vn_worker *w[VN_MAX_WORKERS];
	pthread_mutex_t lock;
	pthread_cond_t cond;
	int pause_req;
	int paused;
	int stopping;
	int started;
	int nmem;
	struct vn_region mem[VN_MAX_REGIONS];
	uint8_t *mirror;
	int kick_fd[VN_MAX_QID];
	int call_fd[VN_MAX_VECTORS];
	struct vn_sq sq[VN_MAX_QID];
	struct vn_cq cq[VN_MAX_QID];
	struct vn_ns *ns[VN_MAX_NS + 1];
	int dbbuf_on;
	uint8_t *shadow;
	uint8_t *eventidx;
	int wce;
	pthread_mutex_t err_lock;
	int err_head;
	int err_count;
	struct vn_err errs[VN_ERR_RING];
	struct vn_ctrl_stats admin_st;
};

struct vn_cmd {
	uint8_t opc;
	uint8_t flags;
	uint16_t cid;
	uint32_t nsid;
	uint32_t cdw2;
	uint32_t cdw3;
	uint64_t mptr;
	uint64_t prp1;
	uint64_t prp2;
	uint32_t cdw10;
	uint32_t cdw11;
	uint32_t cdw12;
	uint32_t cdw13;
	uint32_t cdw14;
	uint32_t cdw15;
};

uint64_t vn_now_ns(void);
void vn_cond_wait_briefly(pthread_cond_t *cond, pthread_mutex_t *lock);
void vn_err_record(struct vn_ctrl *c, uint16_t sqid, uint16_t cid, uint16_t status, uint32_t nsid, uint64_t lba);
uint16_t vn_prp_map(struct vn_ctrl *c, uint64_t prp1, uint64_t prp2, uint32_t len,
		    struct iovec *iov, int *niov);
void *vn_worker_main(void *arg);
int vn_worker_init(struct vn_worker *w);
void vn_worker_fini(struct vn_worker *w);

#endif
