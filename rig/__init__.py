"""The kernel rig: run a command inside Debian's 6.12 kernel when this host's kernel cannot serve nvmet.

Ground truth for everything that touches configfs, a backend or a transport is a real kernel; the rig makes one
available anywhere qemu runs (TCG, no KVM needed), with the host's root filesystem shared read-only and the repo
writable, so tests see exactly the code and tools of the host.
"""
