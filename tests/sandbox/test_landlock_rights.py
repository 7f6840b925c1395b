"""The Landlock rights the sandbox handles come from the kernel's ABI version (no Python
package): every right this kernel can restrict, and not one more."""

from __future__ import annotations

import errno
import os

import pytest

from workerloader.sandbox import _syscalls as sc


def test_this_kernel_has_landlock() -> None:
    assert sc.landlock_abi_version() >= 1


def test_the_rights_are_those_of_the_abi_version() -> None:
    abi, rights = sc.landlock_abi_version(), sc.landlock_fs_rights()
    assert rights & 0x1FFF == 0x1FFF  # ABI 1: execute ... make_sym
    assert bool(rights & 1 << 13) == (abi >= 2)  # REFER
    assert bool(rights & 1 << 14) == (abi >= 3)  # TRUNCATE
    assert bool(rights & 1 << 15) == (abi >= 5)  # IOCTL_DEV
    for right in (sc.LANDLOCK_EXECUTE, sc.LANDLOCK_READ_FILE, sc.LANDLOCK_READ_DIR):
        assert rights & right


def test_the_kernel_takes_every_right_and_refuses_the_next_bit() -> None:
    rights = sc.landlock_fs_rights()
    os.close(sc.landlock_ruleset(rights, [("/tmp", rights)]))
    unknown = 1 << rights.bit_length()
    with pytest.raises(OSError, match=os.strerror(errno.EINVAL)) as refused:
        sc.landlock_ruleset(rights | unknown, [])
    assert refused.value.errno == errno.EINVAL
