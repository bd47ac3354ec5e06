#!/usr/bin/env bash
# tlshd (ktls-utils), the userspace TLS handshake agent NVMe/TCP TLS needs, is not packaged for bookworm or its
# backports. Debian trixie's binary package is fetched with `apt-get download` through a private apt setup whose only
# source is derived from this machine's debian.sources (same URIs and keyring, Suites: trixie): no host name is written
# anywhere and the system's apt sources are left alone. The package is extracted with `dpkg-deb -x` into a project-owned
# prefix instead of `dpkg -i`, because its metadata asks for libgnutls30t64 >= 3.8.1; the tlshd binary itself only needs
# GLIBC_2.34 and GNUTLS_3_7_3 symbol versions, which bookworm's glibc 2.36 and gnutls 3.7.9 provide. This script checks
# that (`ldd` resolves everything, `tlshd --help` runs) before it links the binary into place.
# Usage: tls/fetch-tlshd.sh [PREFIX]   (default /usr/local/lib/nvmetd/ktls-utils; prints the tlshd path)
set -euo pipefail
prefix=${1:-/usr/local/lib/nvmetd/ktls-utils}
tlshd=$prefix/usr/sbin/tlshd
suite=${TLSHD_SUITE:-trixie}
log() { echo "fetch-tlshd: $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
runs() { [ -x "$1" ] && ! ldd "$1" 2>&1 | grep -q 'not found' && "$1" --help >/dev/null 2>&1; }

if runs "$tlshd"; then echo "$tlshd"; exit 0; fi

main_sources=/etc/apt/sources.list.d/debian.sources
[ -f "$main_sources" ] || { log "no $main_sources to derive a $suite entry from"; exit 1; }
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:?}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/parts"
# apt downloads as its _apt user when it can: let it write there.
chmod 755 "$work"; [ "$(id -u)" != 0 ] || ! id _apt >/dev/null 2>&1 || chown -R _apt "$work/lists" "$work/cache" "$work"
# The stanza serving the plain release, with its suite replaced by $suite.
awk -v rel="$codename" -v suite="$suite" '
	function flush() {
		if (hit && uris != "" && !done) { printf "Types: deb\nURIs: %s\nSuites: %s\nComponents: main\n", uris, suite
			if (key != "") printf "Signed-By: %s\n", key; done = 1 }
		hit = 0; uris = ""; key = "" }
	/^[[:space:]]*#/ { next }
	/^[[:space:]]*$/ { flush(); next }
	/^URIs:/ { sub(/^URIs:[[:space:]]*/, ""); uris = $0 }
	/^Signed-By:/ { sub(/^Signed-By:[[:space:]]*/, ""); key = $0 }
	/^Suites:/ { n = split($0, s, /[[:space:]]+/); for (i = 2; i <= n; i++) if (s[i] == rel) hit = 1 }
	END { flush() }' "$main_sources" >"$work/parts/$suite.sources"
[ -s "$work/parts/$suite.sources" ] || { log "no stanza for $codename in $main_sources"; exit 1; }
apt_opts=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$work/parts"
	-o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o "Dir::State::status=/dev/null"
	-o "APT::Architecture=$(dpkg --print-architecture)" -o "Debug::NoLocking=1")
log "fetching ktls-utils from $suite (derived from $main_sources)"
apt-get "${apt_opts[@]}" -q update >&2
(cd "$work" && apt-get "${apt_opts[@]}" -q download ktls-utils >&2)
deb=$(ls "$work"/ktls-utils_*.deb)
as_root mkdir -p "$prefix"
as_root dpkg-deb -x "$deb" "$prefix"
runs "$tlshd" || { log "$tlshd does not run on this system's libraries:"; ldd "$tlshd" >&2 || true; exit 1; }
log "$(basename "$deb") extracted into $prefix"
echo "$tlshd"
