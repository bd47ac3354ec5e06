#!/bin/sh
# /init of the test initramfs: load the stock NVMe driver, then run commands from the second serial port.
# The host writes shell lines to ttyS1 and reads their output there; the kernel console stays on ttyS0.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
core_args=""
nvme_args=""
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	nvme_core.*) core_args="$core_args ${arg#nvme_core.}" ;;
	nvme.*) nvme_args="$nvme_args ${arg#nvme.}" ;;
	esac
done
insmod /lib/modules/nvme-auth.ko
insmod /lib/modules/nvme-core.ko $core_args
insmod /lib/modules/nvme.ko $nvme_args
stty -F /dev/ttyS1 raw -echo
echo "@@READY $(cat /proc/uptime)" > /dev/ttyS1
# a pipe, not the tty, on stdin: a non-interactive shell (no prompt, no echo)
exec sh -c "cat /dev/ttyS1 | sh" > /dev/ttyS1 2>&1
