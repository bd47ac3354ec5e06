#!/usr/bin/env bash
# Build kernel_patches/ for every installed Debian 6.12 kernel: nvmet with the "vhost" port type (0001) and the
# nvmet-vhost transport (0002). The whole drivers/nvme/target directory is rebuilt from the patched tree, so every
# nvmet module comes from one source and their symbol versions agree; they go to
# /lib/modules/<release>/updates/nvmetd, which modprobe prefers to the stock ones.
# Cached: a no-op while the installed modules were built from these patches with this script.
set -euo pipefail
cd "$(dirname "$0")"
HERE=$(pwd)
mapfile -t SERIES < <(grep -v '^\s*#' series | grep .)
WORK=${NVMETD_KBUILD_DIR:-$HERE/../.build/kernel}
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
digest=$(cat series "${SERIES[@]}" build.sh | sha256sum | cut -c1-16)
built=0

for build in /lib/modules/6.12.*-amd64/build; do
	[ -e "$build" ] || continue
	rel=$(basename "$(dirname "$build")")
	dest=/lib/modules/$rel/updates/nvmetd
	[ "$(cat "$dest/.built-from" 2>/dev/null)" = "$digest" ] && continue

	# nvmet's sources at exactly this kernel's package version: its structures must match the running vhost.ko.
	want=$(dpkg-query -W -f='${Version}' "linux-image-$rel")
	have=$(dpkg-query -W -f='${Version}' linux-source-6.12 2>/dev/null || true)
	if [ "$have" != "$want" ]; then
		echo "kernel_patches: installing linux-source-6.12=$want"
		as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			"linux-source-6.12=$want" >/dev/null
	fi

	tree=$WORK/$rel
	rm -rf "$tree"
	mkdir -p "$tree"
	echo "kernel_patches: $rel: extracting nvmet from linux-source-6.12 $want"
	tar -xJf /usr/src/linux-source-6.12.tar.xz -C "$tree" --strip-components=1 --wildcards \
		'linux-source-6.12/drivers/nvme/target/*' 'linux-source-6.12/drivers/nvme/host/*.h' \
		linux-source-6.12/drivers/vhost/vhost.h linux-source-6.12/include/linux/nvme.h
	for patch in "${SERIES[@]}"; do
		patch -d "$tree" -p1 --quiet --forward <"$HERE/$patch"
	done
	# Out of tree: the patched include/ must come before the kernel's own (NOSTDINC_FLAGS precedes LINUXINCLUDE).
	cat >"$tree/drivers/nvme/target/Kbuild" <<'KBUILD'
CONFIG_NVME_TARGET_VHOST := m
NOSTDINC_FLAGS += -I$(src)/../../../include -I$(src)/../../../include/uapi
include $(src)/Makefile
KBUILD
	echo "kernel_patches: $rel: building (nvmet + nvmet-vhost and the other nvmet transports)"
	if ! make -C "$build" M="$tree/drivers/nvme/target" -j"$(nproc)" modules >"$tree/build.log" 2>&1; then
		tail -n 40 "$tree/build.log" >&2
		echo "kernel_patches: build failed for $rel (log: $tree/build.log)" >&2
		exit 1
	fi
	as_root mkdir -p "$dest"
	for ko in "$tree"/drivers/nvme/target/*.ko; do  # renamed into place: a booted rig may be loading them
		as_root install -m 0644 "$ko" "$dest/.$(basename "$ko").new"
		as_root mv -f "$dest/.$(basename "$ko").new" "$dest/$(basename "$ko")"
	done
	as_root depmod -a "$rel"
	for mod in nvmet nvmet-vhost nvmet-tcp nvme-loop; do
		[ "$(modinfo -k "$rel" -n "$mod")" = "$dest/$mod.ko" ] || {
			echo "kernel_patches: modprobe would not load $dest/$mod.ko for $rel" >&2
			exit 1
		}
	done
	echo "$digest" | as_root tee "$dest/.built-from" >/dev/null
	built=$((built + 1))
done
[ "$built" -gt 0 ] && echo "kernel_patches: installed for $built kernel(s)"
exit 0
