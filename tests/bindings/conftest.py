"""Fixtures shared by the binding tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from workerloader import Loader


@pytest.fixture
def loader(tmp_path: Path) -> Loader:
    """A Loader that is not entered: the bindings work without its sandbox."""
    return Loader(tmp_path / "data")
