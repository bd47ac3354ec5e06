# The two commands a newcomer needs: `make demo` and `make test`. Both set the machine up first if needed.
STAMP := .venv/.setup-done
# `make demo` installs only what the demo needs (scripts/setup --demo); `make setup` covers both
DEMO_STAMP := .venv/.setup-demo-done

.PHONY: setup demo test bench bench-vhost bench-vhost-kernel bench-target bench-backends bench-attach bench-cli bench-tls bench-limits bench-offload bench-rbd lint clean
setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup $(wildcard */apt-packages*.txt) $(wildcard kernel_patches/zfs/*)
	scripts/setup
	touch $@ $(DEMO_STAMP)

$(DEMO_STAMP): pyproject.toml scripts/setup vhost_nvme/apt-packages.txt
	scripts/setup --demo
	touch $@

demo: $(DEMO_STAMP)
	.venv/bin/python -m rig -- .venv/bin/python -m nvmetd.demo

test: $(STAMP)
	scripts/test

# fio matrix in the rig VM (every backend x transport vs the raw device), then the plots on the host (fast there).
BENCH_OUT ?= bench-out/latest
BENCH_ARGS ?= --backend file,nullblk,lvm --transport loop,tcp,rdma
bench: $(STAMP)
	.venv/bin/python -m rig --memory 4G --timeout 7200 -- .venv/bin/python -m bench.matrix perf --out $(BENCH_OUT) $(BENCH_ARGS)
	.venv/bin/python -m bench.matrix report $(BENCH_OUT)/report.json > /dev/null

# the vhost transport runs on the host (its guest is TCG): the same jobs vs the same guest on QEMU's emulated NVMe
BENCH_VHOST_ARGS ?= --size 64M --runtime 5 --ramp 1
bench-vhost: $(STAMP)
	.venv/bin/python -m bench.matrix perf --transport vhost --backend file --out bench-out/vhost $(BENCH_VHOST_ARGS)

# the in-kernel vhost-nvme transport vs the engine vs nvme-loop vs the raw device, one null_blk, in the rig
BENCH_VHOST_KERNEL_ARGS ?=
bench-vhost-kernel: $(STAMP)
	.venv/bin/python -m rig --memory 3G -- .venv/bin/python -m bench.vhost_kernel $(BENCH_VHOST_KERNEL_ARGS)

# control plane: 1,000 subsystems into an empty tree, re-apply, one more (add NVMETCLI_SRC=dir for the baseline)
bench-target: $(STAMP)
	.venv/bin/python -m rig --memory 4G -- .venv/bin/python -m bench.target_apply $(if $(NVMETCLI_SRC),--nvmetcli-src $(NVMETCLI_SRC))

bench-backends: $(STAMP)
	.venv/bin/python -m rig --memory 4G -- .venv/bin/python -m bench.backend_io

# NVMe/TCP with TLS 1.3 vs plain NVMe/TCP, same namespace, alternating rounds (bench/tls.py)
bench-tls: $(STAMP)
	.venv/bin/python -m rig --memory 3G -- .venv/bin/python -m bench.tls

# what the kernel-target limit mechanism costs a disk with no limit: direct vs through the throttled path (bench/limits_overhead.py)
bench-limits: $(STAMP)
	.venv/bin/python -m rig --memory 3G -- .venv/bin/python -m bench.limits_overhead

# attach-to-usable latency over loop (median of 50), then with 10, 100, 500 VMs already attached
BENCH_ATTACH_ARGS ?=
bench-attach: $(STAMP)
	.venv/bin/python -m rig --memory 4G --timeout 7200 -- .venv/bin/python -m bench.attach $(BENCH_ATTACH_ARGS)

# host CPU per I/O and IOPS of one guest job: local vhost-nvme vs offload to the software DPU vs NVMe/TCP from the host
BENCH_OFFLOAD_ARGS ?=
bench-offload: $(STAMP)
	.venv/bin/python -m rig -- .venv/bin/python -m bench.offload $(BENCH_OFFLOAD_ARGS)

# an RBD image exported through nvmet (loop, tcp) vs the raw krbd device vs a local zvol; 4k writes in a 2-OSD outage
bench-rbd: $(STAMP)
	.venv/bin/python -m rig --memory 4G -- .venv/bin/python -m bench.rbd

# nvmetctl start-up and an attach round trip with 1,000 VMs on a fake configfs tree (host, no kernel)
bench-cli: $(STAMP)
	.venv/bin/python -m bench.cli_startup $(BENCH_CLI_ARGS)

lint: $(STAMP)
	.venv/bin/ruff check .

clean:
	rm -rf .venv build *.egg-info .pytest_cache .ruff_cache
