#!/usr/bin/env bash
# The OpenZFS fix nvmetd's zvol delete depends on (0001-*.patch: manual TRIM and `zpool initialize` skip the
# first 4 MiB of every metaslab, so a destroyed zvol's blocks survived `zpool trim -w` on the raw vdev): applied to
# the zfs-dkms source in /usr/src and built by DKMS for every installed Debian 6.12 kernel, the same way Debian
# builds the module. Run by scripts/setup before its own `dkms autoinstall`, so a fresh machine builds ZFS once.
# Cached: a no-op while each kernel's installed module was built from this patch (a marker beside the module).
set -euo pipefail
cd "$(dirname "$0")"
PATCH=$PWD/0001-trim-initialize-record-progress-without-the-label-area.patch
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
digest=$(sha256sum <"$PATCH" | cut -c1-16)  # the module changes only with the patch

ver=$(dpkg-query -W -f='${Version}' zfs-dkms)
ver=${ver%%-*}
src=/usr/src/zfs-$ver
[ -d "$src" ] || { echo "zfs patch: no DKMS source at $src" >&2; exit 1; }
if patch -d "$src" -p1 -R --dry-run --force --silent <"$PATCH" >/dev/null 2>&1; then
	:  # already in the source (an earlier run, or a zfs release with the fix)
elif patch -d "$src" -p1 --dry-run --force --silent <"$PATCH" >/dev/null 2>&1; then
	echo "zfs patch: applying $(basename "$PATCH") to $src"
	as_root patch -d "$src" -p1 --forward --silent <"$PATCH"
else
	echo "zfs patch: $(basename "$PATCH") applies neither way to zfs $ver: check whether the release fixed" \
		"the TRIM offset (module/zfs/vdev_trim.c) and update kernel_patches/zfs/" >&2
	exit 1
fi

for headers in /usr/src/linux-headers-6.12.*-amd64; do
	rel=${headers#/usr/src/linux-headers-}
	[ -d "/lib/modules/$rel" ] || continue
	marker=/lib/modules/$rel/updates/dkms/.nvmetd-zfs-patch
	[ "$(cat "$marker" 2>/dev/null)" = "$digest" ] && continue
	echo "zfs patch: building zfs $ver for $rel through DKMS (several minutes)"
	as_root dkms remove -m zfs -v "$ver" -k "$rel" >/dev/null 2>&1 || true  # not built yet on a fresh machine
	log=$(mktemp)
	if ! as_root dkms install -m zfs -v "$ver" -k "$rel" >"$log" 2>&1; then
		tail -n 30 "$log" >&2
		echo "zfs patch: DKMS build failed for $rel (make.log under /var/lib/dkms/zfs/$ver/)" >&2
		exit 1
	fi
	rm -f "$log"
	modinfo -k "$rel" zfs >/dev/null
	echo "$digest" | as_root tee "$marker" >/dev/null
done
exit 0
