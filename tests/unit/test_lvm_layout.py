"""LVM pool layouts (backends/lvm.py): what `pool create --kind lvm --layout` refuses before any LVM command runs.
The real raid1 pool losing a drive is tests/kernel/test_drives.py."""

from __future__ import annotations

import pytest

from backends import lvm
from backends.errors import BackendError
from backends.lvm import LvmBackend


@pytest.mark.parametrize("devices, layout, why", [
    (["/dev/a"], "mirror", "two or more"),
    (["/dev/a", "/dev/b"], "raid5", "not one of stripe, mirror"),
    ([], "mirror", "one or more"),
])
def test_layouts_refused_before_lvm_is_touched(monkeypatch: pytest.MonkeyPatch, devices: list[str], layout: str,
                                               why: str) -> None:
    ran: list[list[str]] = []
    monkeypatch.setattr(lvm, "run", lambda argv, check=True: ran.append(argv))
    with pytest.raises(BackendError, match=why):
        LvmBackend.make_pool("p", devices, {"layout": layout})
    assert ran == []
