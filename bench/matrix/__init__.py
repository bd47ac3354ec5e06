"""The fio benchmark harness: does a path lose or corrupt data, and what does it cost compared with the raw disk?

Start here:
- fio_jobs/*.fio     the job files (readable and runnable by hand: integrity, integrity-trim, perf-matrix)
- cli.py             `python -m bench.matrix perf|integrity|report|compare --help`
- runner.py          the loop: backend x transport, baseline on the raw device in the same run
- disks.py           where disks come from (THE seam for the backends/ registry: `provision`)
- transports.py      loop / tcp / rdma (soft-RoCE on a veth pair); the extension point for vhost-nvme
- export.py          exporting through target/ (and removing exactly what was added)
- fio.py, cpu.py     running fio, parsing its JSON and verify failures; host CPU from /proc/stat
- tables.py, plots.py  the matrix's ratios, Markdown, compare; its PNGs (on bench/report.py)
"""
