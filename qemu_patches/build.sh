#!/usr/bin/env bash
# Build qemu-system-x86_64 with the vhost-user-nvme device: QEMU 10.0.2 from Debian's bookworm-backports source
# (fetched with apt-get source), the patches listed in qemu_patches/series, a minimal x86_64 device set.
#
#   qemu_patches/build.sh            # prints the binary's path; no-op when it is newer than every input
#   QEMU_BUILD_DIR=... JOBS=2 qemu_patches/build.sh
#
# Everything lands in $QEMU_BUILD_DIR (default .build/qemu in the repository, gitignored):
#   src/      the verified orig tarball      qemu-10.0.2/  patched tree      qemu-system-x86_64  the binary
# Needs root (or sudo) only when apt sources or packages are missing.
set -euo pipefail
# All of it in a function: bash parses a function whole before running it, so editing this file while a
# build runs cannot derail that build.
main() {
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
out=${QEMU_BUILD_DIR:-$root/.build/qemu}
jobs=${JOBS:-2}
upstream=10.0.2
binary=$out/qemu-system-x86_64
inputs=("$here/build.sh" "$here/series" "$here"/*.patch)

log() { echo "qemu_patches/build.sh: $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# ---- cache: nothing to do when the binary is newer than the script and the patches ----
if [ -x "$binary" ]; then
	stale=0
	for f in "${inputs[@]}"; do [ "$f" -nt "$binary" ] && stale=1; done
	if [ $stale = 0 ]; then echo "$binary"; exit 0; fi
fi

# ---- apt sources: deb-src for the configured suites, plus <codename>-backports, all derived from ----
# ---- debian.sources (same URIs and keyring; no host name is written here)                        ----
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:?}")
main_sources=/etc/apt/sources.list.d/debian.sources
src_list=/etc/apt/sources.list.d/nvmetd-qemu-src.sources
derive() { # $1 = Types, $2 = "" (copy each stanza) or a suite (one stanza for it, from the $codename stanza)
	awk -v types="$1" -v suite="$2" -v rel="$codename" '
		function flush() {
			if (uris != "" && (suite == "" || (hit && !done))) {
				printf "Types: %s\nURIs: %s\nSuites: %s\nComponents: %s\n", types, uris, (suite == "" ? suites : suite), comps
				if (key != "") printf "Signed-By: %s\n", key
				printf "\n"; if (suite != "") done = 1
			}
			hit = 0; uris = ""; key = ""; suites = ""; comps = "main"
		}
		BEGIN { comps = "main" }
		/^[[:space:]]*#/ { next }
		/^[[:space:]]*$/ { flush(); next }
		/^URIs:/ { sub(/^URIs:[[:space:]]*/, ""); uris = $0 }
		/^Components:/ { sub(/^Components:[[:space:]]*/, ""); comps = $0 }
		/^Signed-By:/ { sub(/^Signed-By:[[:space:]]*/, ""); key = $0 }
		/^Suites:/ { sub(/^Suites:[[:space:]]*/, ""); suites = $0
			n = split(suites, s, /[[:space:]]+/); for (i = 1; i <= n; i++) if (s[i] == rel) hit = 1 }
		END { flush() }' "$main_sources"
}
apt_updated=0
have_suite() { # $1 = deb or deb-src, $2 = suite: is it configured in any sources file (one-line or deb822)?
	local f
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
		[ -f "$f" ] || continue
		awk -v want="$1" -v suite="$2" '
			function flush() { if (t && s && !off) found = 1; t = 0; s = 0; off = 0 }
			/^[[:space:]]*#/ { next }
			/^[[:space:]]*$/ { flush(); next }
			$1 == want && FILENAME ~ /\.list$/ { for (i = 2; i <= NF; i++) if ($i == suite) found = 1 }
			/^Types:/ { for (i = 2; i <= NF; i++) if ($i == want) t = 1 }
			/^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) s = 1 }
			/^Enabled:[[:space:]]*no/ { off = 1 }
			END { flush(); exit !found }' "$f" && return 0
	done
	return 1
}
# Files written here have names of their own: never rewrite a sources file somebody else made.
if ! have_suite deb "$codename-backports"; then
	[ -f "$main_sources" ] || { log "no $main_sources to derive a $codename-backports entry from"; exit 1; }
	log "adding $codename-backports (derived from $main_sources)"
	derive deb "$codename-backports" | as_root tee /etc/apt/sources.list.d/nvmetd-qemu-backports.sources >/dev/null
	as_root apt-get update -q; apt_updated=1
fi
if ! have_suite deb-src "$codename-backports"; then
	[ -f "$main_sources" ] || { log "no $main_sources to derive deb-src entries from"; exit 1; }
	log "adding deb-src entries (derived from $main_sources)"
	{ derive deb-src ""; derive deb-src "$codename-backports"; } | as_root tee "$src_list" >/dev/null
	as_root apt-get update -q; apt_updated=1
fi

# ---- build dependencies: QEMU 10 needs meson >= 1.5 and pycotap, which bookworm has only in backports ----
pkg_ok() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
missing=()
while read -r pkg; do pkg_ok "$pkg" || missing+=("$pkg"); done < <(grep -v '^\s*#' "$here/apt-packages.txt" | grep .)
if [ ${#missing[@]} -gt 0 ]; then
	log "installing ${missing[*]}"
	[ $apt_updated = 1 ] || { as_root apt-get update -q; apt_updated=1; }
	as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
meson_version=$(dpkg-query -W -f='${Version}' meson 2>/dev/null || echo 0)
if ! dpkg --compare-versions "$meson_version" ge 1.5 || ! pkg_ok python3-pycotap; then
	log "installing meson and python3-pycotap from $codename-backports (meson $meson_version is too old for QEMU 10)"
	[ $apt_updated = 1 ] || { as_root apt-get update -q; apt_updated=1; }
	as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
		-t "$codename-backports" meson python3-pycotap
fi

# ---- source: the orig tarball of the backports package, checked against the Sources index ----
version=$(apt-cache showsrc qemu | awk '/^Version:/ { print $2 }' | grep -F ":$upstream+" | sort -u | head -n1)
[ -n "$version" ] || { log "apt knows no qemu source package for $upstream (deb-src for $codename-backports?)"; exit 1; }
mkdir -p "$out/src"
cd "$out/src"
# The .dsc and .debian.tar.xz of this backport are missing from the mirror (404) while the orig tarball is there.
# Nothing of the Debian packaging is needed, so take the orig tarball and check its SHA256 from the index.
orig=$(apt-get source --print-uris "qemu=$version" 2>/dev/null | awk '$2 ~ /\.orig\.tar\./ { print $2; print $4 }' || true)
if [ -z "$orig" ]; then # already downloaded: apt skips it in --print-uris, so ask in an empty directory
	orig=$(mkdir -p "$out/src/.probe" && cd "$out/src/.probe" && apt-get source --print-uris "qemu=$version" 2>/dev/null |
		awk '$2 ~ /\.orig\.tar\./ { print $2; print $4 }')
fi
tarball=$(echo "$orig" | sed -n 1p)
sha=$(echo "$orig" | sed -n 2p | sed 's/^SHA256://')
[ -n "$tarball" ] && [ -n "$sha" ] || { log "apt-get source --print-uris qemu=$version names no orig tarball"; exit 1; }
if ! echo "$sha  $tarball" | sha256sum -c --quiet 2>/dev/null; then
	log "fetching $tarball (apt-get source qemu=$version)"
	apt-get source --download-only "qemu=$version" >/dev/null 2>&1 || true # .dsc 404 is expected, see above
	echo "$sha  $tarball" | sha256sum -c --quiet || { log "$tarball missing or its SHA256 differs from the index"; exit 1; }
fi

# ---- patched tree: incremental when the tree of a previous run is there ----
# $out/applied/ keeps copies of the patches that are in the tree.  Patches unchanged at the head of the series
# stay applied; the rest are reversed and the new ones applied, so ninja recompiles only what they touch.
# A patch that does not reverse cleanly means an unknown tree: start from a fresh one.
tree=$out/qemu-$upstream
applied=$out/applied
mapfile -t want < <(grep -v '^\s*#' "$here/series" | grep .)
have=()
[ -f "$applied/series" ] && [ -f "$tree/build/build.ninja" ] && mapfile -t have < "$applied/series"
keep=0
while [ $keep -lt ${#have[@]} ] && [ $keep -lt ${#want[@]} ] && [ "${have[$keep]}" = "${want[$keep]}" ] &&
	cmp -s "$applied/${have[$keep]}" "$here/${want[$keep]}"; do
	keep=$((keep + 1))
done
fresh=1
if [ ${#have[@]} -gt 0 ]; then
	fresh=0
	for ((i = ${#have[@]} - 1; i >= keep; i--)); do
		log "reversing ${have[$i]}"
		patch -d "$tree" -p1 -R --batch --quiet < "$applied/${have[$i]}" || { fresh=1; break; }
	done
fi
if [ $fresh = 1 ]; then
	keep=0
	rm -rf "$tree" "$applied"
	tar -C "$out" --no-same-owner -xf "$out/src/$tarball"
	[ -d "$tree" ] || { log "$tarball did not unpack to qemu-$upstream"; exit 1; }
fi
mkdir -p "$applied"
: > "$applied/series"
for ((i = 0; i < ${#want[@]}; i++)); do
	if [ $i -ge $keep ]; then
		log "applying ${want[$i]}"
		patch -d "$tree" -p1 --batch --forward --quiet < "$here/${want[$i]}"
		cp "$here/${want[$i]}" "$applied/"
	fi
	echo "${want[$i]}" >> "$applied/series"
done

devices=$tree/configs/devices/x86_64-softmmu/nvmetd-minimal.mak
{
	echo "# q35 with the device under test and QEMU's own NVMe controller (the benchmark's reference)"
	echo "CONFIG_Q35=y"
	echo "CONFIG_NVME_PCI=y"
	echo "# hw/nvme/ctrl.c calls spdm_socket_*, which is only \"default y\""
	echo "CONFIG_SPDM_SOCKET=y"
	echo "CONFIG_VHOST_USER_NVME=y"
	echo "# a PCIe root port, so that nvmetctl attach --qmp can hot-plug the device into a running q35 guest"
	echo "CONFIG_PCIE_PORT=y"
} > "$devices.new"
if cmp -s "$devices.new" "$devices"; then rm "$devices.new"; else mv "$devices.new" "$devices"; fi

mkdir -p "$tree/build"
cd "$tree/build"
if [ ! -f build.ninja ]; then
	log "configure"
	../configure --python=/usr/bin/python3 --target-list=x86_64-softmmu \
		--without-default-features --without-default-devices --with-devices-x86_64=nvmetd-minimal \
		--enable-tcg --enable-kvm --enable-vhost-user --disable-docs --disable-tools --disable-guest-agent \
		--disable-werror --disable-debug-info --disable-install-blobs >"$out/configure.log" 2>&1 ||
		{ tail -n 30 "$out/configure.log" >&2; rm -f build.ninja; exit 1; }
fi
log "ninja -j$jobs qemu-system-x86_64"
ninja -j"$jobs" qemu-system-x86_64 >"$out/build.log" 2>&1 ||
	{ grep -E -A5 'error|FAILED' "$out/build.log" | head -n 60 >&2; exit 1; }
install -m 0755 qemu-system-x86_64 "$binary.new"
mv "$binary.new" "$binary"
log "built $binary"
echo "$binary"
}

main "$@"
