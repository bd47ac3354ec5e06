"""Every benchmark of the project, each a thin module on one statistics and report module (`report.py`).

Benchmarks print figures and ratios to a baseline measured in the same run; they are not tests.

- report.py         Sample (median, min..max, p90), ratios, Report -> report.json / report.md / ratios.png, progress
- matrix/           the fio harness: every backend x transport vs the raw device (`make bench`, `nvmetctl bench`)
- attach.py         attach-to-usable latency and configfs reads as VMs accumulate (`make bench-attach`)
- target_apply.py   control plane: 1,000 subsystems applied, re-applied, one more (`make bench-target`)
- backend_io.py     4k random / 128k sequential writes per backend through nvme-tcp (`make bench-backends`)
- vhost_engine.py   the vhost-nvme engine vs fio psync/io_uring on the same file (`python -m bench.vhost_engine`)
- vhost_guest.py    a TCG guest on vhost-user-nvme vs QEMU's emulated NVMe (`python -m bench.vhost_guest`)
- limits_overhead.py  an unlimited disk through the limit mechanism (dm-linear + blk-throttle) vs direct
- tls.py            NVMe/TCP with TLS 1.3 vs plain NVMe/TCP: IOPS, MB/s, CPU per I/O (`make bench-tls`)
"""
