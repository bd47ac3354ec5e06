// SPDX-License-Identifier: Apache-2.0
/*
 * Guest memory: regions handed over as file descriptors, and the PRP walk.
 * Every guest-supplied address goes through vn_gpa(), which only ever
 * returns a pointer when the whole range lies inside one mapped region, so
 * a hostile address becomes an NVMe status instead of a host fault.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "vn_internal.h"

#define VN_PAGE_MASK	((uint64_t)VN_PAGE_SIZE - 1)

int vn_mem_add(struct vn_ctrl *c, int fd, uint64_t fd_offset, uint64_t gpa, uint64_t size)
{
	struct stat st;
	void *p;
	int i, seals;

	if (c->nmem >= VN_MAX_REGIONS)
		return -ENOSPC;
	if (!size || ((gpa | size | fd_offset) & VN_PAGE_MASK) || gpa + size < gpa)
		return -EINVAL;
	for (i = 0; i < c->nmem; i++) {
		struct vn_region *r = &c->mem[i];

		if (gpa < r->gpa + r->size && r->gpa < gpa + size)
			return -EEXIST;
	}
	/* A region that can shrink under us would turn a guest access into SIGBUS. */
	seals = fcntl(fd, F_GET_SEALS);
	if (seals >= 0 && !(seals & F_SEAL_SHRINK))
		fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK);
	if (fstat(fd, &st) < 0)
		return -errno;
	if ((uint64_t)st.st_size < fd_offset + size)
		return -ERANGE;
	p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)fd_offset);
	if (p == MAP_FAILED)
		return -errno;
	c->mem[c->nmem].gpa = gpa;
	c->mem[c->nmem].size = size;
	c->mem[c->nmem].hva = p;
	c->nmem++;
	return 0;
}

void vn_mem_clear(struct vn_ctrl *c)
{
	int i;

	for (i = 0; i < c->nmem; i++)
		munmap(c->mem[i].hva, c->mem[i].size);
	c->nmem = 0;
}

void *vn_gpa(struct vn_ctrl *c, uint64_t gpa, uint64_t len)
{
	int i;

	for (i = 0; i < c->nmem; i++) {
		struct vn_region *r = &c->mem[i];
		uint64_t off = gpa - r->gpa;

		if (gpa >= r->gpa && off < r->size && len <= r->size - off)
			return r->hva + off;
	}
	return NULL;
}

static uint16_t add_seg(struct vn_ctrl *c, uint64_t gpa, uint32_t len,
			struct iovec *iov, int *niov)
{
	uint8_t *p = vn_gpa(c, gpa, len);
	struct iovec *last;

	if (!p)
		return VN_SC_DATA_XFER_ERROR | VN_SC_DNR;
	if (*niov) {
		last = &iov[*niov - 1];
		if ((uint8_t *)last->iov_base + last->iov_len == p) {
			last->iov_len += len;
			return 0;
		}
	}
	if (*niov >= VN_MAX_IOV)
		return VN_SC_INVALID_FIELD | VN_SC_DNR;
	iov[*niov].iov_base = p;
	iov[*niov].iov_len = len;
	(*niov)++;
	return 0;
}

/*
 * PRP1 may start anywhere dword aligned; every later page must start at
 * offset 0.  PRP2 is a data pointer when the rest fits in one page, else
 * a qword-aligned PRP list pointer whose last entry chains to the next list
 * page when more entries are needed than the page holds.
 */
uint16_t vn_prp_map(struct vn_ctrl *c, uint64_t prp1, uint64_t prp2, uint32_t len,
		    struct iovec *iov, int *niov)
{
	uint32_t first, chunk, nent, i;
	uint64_t list, ent;
	volatile uint64_t *ents;
	uint16_t st;

	*niov = 0;
	if (!len)
		return 0;
	if (len > VN_MAX_XFER)
		return VN_SC_INVALID_FIELD | VN_SC_DNR;
	if (prp1 & 3)
		return VN_SC_INVALID_PRP_OFS | VN_SC_DNR;
	first = VN_PAGE_SIZE - (uint32_t)(prp1 & VN_PAGE_MASK);
	if (first > len)
		first = len;
	st = add_seg(c, prp1, first, iov, niov);
	if (st)
		return st;
	len -= first;
	if (!len)
		return 0;
	if (len <= VN_PAGE_SIZE) {
		if (prp2 & VN_PAGE_MASK)
			return VN_SC_INVALID_PRP_OFS | VN_SC_DNR;
		return add_seg(c, prp2, len, iov, niov);
	}
	if (prp2 & 7)
		return VN_SC_INVALID_PRP_OFS | VN_SC_DNR;
	list = prp2;
	while (len) {
		nent = (VN_PAGE_SIZE - (uint32_t)(list & VN_PAGE_MASK)) / 8;
		ents = vn_gpa(c, list, (uint64_t)nent * 8);
		if (!ents)
			return VN_SC_DATA_XFER_ERROR | VN_SC_DNR;
		for (i = 0; i < nent && len; i++) {
			ent = ents[i];	/* read once: the guest may rewrite it */
			if (i == nent - 1 && len > VN_PAGE_SIZE) {
				if (ent & VN_PAGE_MASK)
					return VN_SC_INVALID_PRP_OFS | VN_SC_DNR;
				list = ent;
				break;
			}
			if (ent & VN_PAGE_MASK)
				return VN_SC_INVALID_PRP_OFS | VN_SC_DNR;
			chunk = len < VN_PAGE_SIZE ? len : VN_PAGE_SIZE;
			st = add_seg(c, ent, chunk, iov, niov);
			if (st)
				return st;
			len -= chunk;
		}
	}
	return 0;
}

uint16_t vn_prp_copy(struct vn_ctrl *c, uint64_t prp1, uint64_t prp2, void *buf, uint32_t len, int to_guest)
{
	struct iovec iov[VN_MAX_IOV];
	uint8_t *p = buf;
	int niov, i;
	uint16_t st;

	st = vn_prp_map(c, prp1, prp2, len, iov, &niov);
	if (st)
		return st;
	for (i = 0; i < niov; i++) {
		if (to_guest)
			memcpy(iov[i].iov_base, p, iov[i].iov_len);
		else
			memcpy(p, iov[i].iov_base, iov[i].iov_len);
		p += iov[i].iov_len;
	}
	return 0;
}
