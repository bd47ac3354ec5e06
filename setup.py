"""Build hook: compiles the cffi (API mode) C extensions; metadata lives in pyproject.toml."""

from setuptools import setup

setup(
    cffi_modules=[
        "vhost_nvme/_build_engine.py:ffibuilder",
        "vhost_nvme/_build_guest.py:ffibuilder",
    ],
)
