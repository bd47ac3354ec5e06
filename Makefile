# The two commands a newcomer needs: `make demo` and `make test`. Both set the machine up first if needed.
STAMP := .venv/.setup-done

.PHONY: setup demo test bench bench-vhost bench-target bench-backends bench-attach lint clean
setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup $(wildcard */apt-packages*.txt)
	scripts/setup
	touch $@

demo: $(STAMP)
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

# control plane: 1,000 subsystems into an empty tree, re-apply, one more (add NVMETCLI_SRC=dir for the baseline)
bench-target: $(STAMP)
	.venv/bin/python -m rig --memory 4G -- .venv/bin/python -m bench.target_apply $(if $(NVMETCLI_SRC),--nvmetcli-src $(NVMETCLI_SRC))

bench-backends: $(STAMP)
	.venv/bin/python -m rig --memory 4G -- .venv/bin/python -m bench.backend_io

# attach-to-usable latency over loop (median of 50), then with 10, 100, 500 VMs already attached
BENCH_ATTACH_ARGS ?=
bench-attach: $(STAMP)
	.venv/bin/python -m rig --memory 4G --timeout 7200 -- .venv/bin/python -m bench.attach $(BENCH_ATTACH_ARGS)

lint: $(STAMP)
	.venv/bin/ruff check .

clean:
	rm -rf .venv build *.egg-info .pytest_cache .ruff_cache
