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
# Hold the command port open from here on: a serial port nobody has open drops what it receives, so the
# host's first command could be lost between our READY and the shell's open.
exec 3<>/dev/ttyS1
stty raw -echo <&3
echo "@@READY $(cat /proc/uptime)" >&3
# stdout a pipe rather than the tty: ash is then not interactive (no prompt, no echo of the input)
exec sh -c "sh -s <&3 2>&1 | cat >&3"
