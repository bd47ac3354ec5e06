"""vhost_nvme.qemu_args: the QEMU argv fragment nvmetd will hand to a VM for a vhost-user-nvme controller."""

from __future__ import annotations

import pytest

from vhost_nvme.qemu_args import device_args, qemu_args, shared_memory_args


def test_full_fragment_has_shared_memory_chardev_and_device():
    args = qemu_args("/run/nvmetd/vm1.sock", memory="2G")
    assert args == [
        "-object", "memory-backend-memfd,id=vnmem,size=2G,share=on",
        "-machine", "memory-backend=vnmem",
        "-chardev", "socket,id=vn0-chr,path=/run/nvmetd/vm1.sock,reconnect-ms=200",
        "-device", "vhost-user-nvme,id=vn0,chardev=vn0-chr",
    ]


def test_without_memory_only_chardev_and_device():
    args = qemu_args("/s", memory=None, dev_id="disk1", max_ioqpairs=4, subnqn="nqn.x:y")
    assert args == ["-chardev", "socket,id=disk1-chr,path=/s,reconnect-ms=200",
                    "-device", "vhost-user-nvme,id=disk1,chardev=disk1-chr,max-ioqpairs=4,subnqn=nqn.x:y"]


def test_commas_in_values_are_escaped():
    args = device_args("/tmp/a,b.sock", reconnect_ms=0)
    assert args[1] == "socket,id=vn0-chr,path=/tmp/a,,b.sock"  # no reconnect-ms when 0
    assert shared_memory_args("1G", "m,x")[1] == "memory-backend-memfd,id=m,,x,size=1G,share=on"


@pytest.mark.parametrize("bad", [0, 64])
def test_queue_pairs_out_of_range(bad):
    with pytest.raises(ValueError):
        device_args("/s", max_ioqpairs=bad)
