"""Fixtures every kernel test module may use without importing them (pytest finds them here)."""

from tests.kernel.backend_rig import loops, make_pool  # noqa: F401 (fixtures)
from tests.kernel.ceph_fixture import ceph  # noqa: F401 (the Ceph test cluster, started once a session on first use)
from tests.kernel.kernel_log import clean_kernel_log, vhost_module  # noqa: F401 (the kernel's verdict; nvmet-vhost)
from tests.kernel.opi_world import opi_world  # noqa: F401 (the OPI tests' nvmetd and software DPU, made once a session)
from tests.kernel.vhost_target import backing  # noqa: F401 (the vhost tests' loop device and its backing file)
