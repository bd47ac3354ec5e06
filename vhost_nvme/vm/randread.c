/*
 * randread: 4 KiB random reads at queue depth 1 with O_DIRECT, for the guest
 * side of `python -m vhost_nvme.vm.bench`.  Built static, runs in the
 * initramfs.  Prints one line:
 *   RANDREAD ios=N seconds=S iops=X p50_us=Y p99_us=Z
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define BS 4096
#define MAX_SAMPLES (1 << 22)

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
	uint64_t size, blocks, start, end, t0, rng = 0x9E3779B97F4A7C15ull;
	uint32_t *lat;
	double secs;
	size_t n = 0;
	void *buf;
	int fd;

	if (argc != 3) {
		fprintf(stderr, "usage: randread DEVICE SECONDS\n");
		return 2;
	}
	fd = open(argv[1], O_RDONLY | O_DIRECT);
	if (fd < 0 || ioctl(fd, BLKGETSIZE64, &size) < 0) {
		perror(argv[1]);
		return 1;
	}
	blocks = size / BS;
	lat = malloc(MAX_SAMPLES * sizeof(*lat));
	if (!blocks || !lat || posix_memalign(&buf, BS, BS)) {
		fprintf(stderr, "randread: no memory or empty device\n");
		return 1;
	}
	secs = atof(argv[2]);
	start = now_ns();
	end = start + (uint64_t)(secs * 1e9);
	for (t0 = start; t0 < end && n < MAX_SAMPLES; ) {
		uint64_t t1;

		rng ^= rng << 13;
		rng ^= rng >> 7;
		rng ^= rng << 17;
		if (pread(fd, buf, BS, (off_t)((rng % blocks) * BS)) != BS) {
			perror("pread");
			return 1;
		}
		t1 = now_ns();
		lat[n++] = (uint32_t)((t1 - t0) / 1000 ? (t1 - t0) / 1000 : 1);
		t0 = t1;
	}
	qsort(lat, n, sizeof(*lat), cmp_u32);
	secs = (t0 - start) / 1e9;
	printf("RANDREAD ios=%zu seconds=%.3f iops=%.1f p50_us=%u p99_us=%u\n",
	       n, secs, n / secs, lat[n / 2], lat[(n * 99) / 100]);
	return 0;
}
