#!/bin/bash
# Runs first inside the rig VM: prepare what a booted host would have (configfs, udev, writable tmp), then run
# the command from the given working directory. Its exit status is the VM's.
set -u
workdir=$1; shift
modprobe -q configfs 2>/dev/null
mountpoint -q /sys/kernel/config || mount -t configfs none /sys/kernel/config
mkdir -p /run/nvmetd /var/lib/nvmetd
if ! pgrep -x systemd-udevd >/dev/null && [ -x /lib/systemd/systemd-udevd ]; then
	/lib/systemd/systemd-udevd --daemon >/dev/null 2>&1 && udevadm trigger --action=add >/dev/null 2>&1
fi
ip link set lo up 2>/dev/null
# cached read-only views of the Python trees (see rig/vm.py: cached_python_mounts)
IFS=: read -r -a rig_mounts <<< "${NVMETD_RIG_MOUNTS:-}"
for entry in "${rig_mounts[@]}"; do
	tag=${entry%%=*} dir=${entry#*=}
	mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=524288,cache=loose "$tag" "$dir" 2>/dev/null ||
		echo "rig: could not mount a cached view of $dir; imports will be slow" >&2
done
export NVMETD_IN_RIG=1 PYTHONDONTWRITEBYTECODE=1
cd "$workdir" || exit 2
"$@"
