"""Fixtures every kernel test module may use without importing them (pytest finds them here)."""

from tests.kernel.backend_rig import loops, make_pool  # noqa: F401 (fixtures)
from tests.kernel.ceph_fixture import ceph  # noqa: F401 (the Ceph test cluster, started once a session on first use)
from tests.kernel.opi_world import opi_world  # noqa: F401 (the OPI tests' nvmetd and software DPU, made once a session)
