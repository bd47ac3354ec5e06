"""Fixtures every kernel test module may use without importing them (pytest finds them here)."""

from tests.kernel.backend_rig import loops, make_pool  # noqa: F401 (fixtures)
