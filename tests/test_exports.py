"""The public surface is curated: ``__all__`` is exactly the public names, and all exist."""

from __future__ import annotations

import importlib
import types

import pytest

PUBLIC_MODULES = [
    "workerloader",
    "workerloader.rpc",
    "workerloader.bench",
    "workerloader.bindings",
    "workerloader.loader",
    "workerloader.sandbox",
    "workerloader.server",
]


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_all_lists_exactly_the_public_names(name: str) -> None:
    module = importlib.import_module(name)
    for attr in getattr(module, "__all__", []):
        getattr(module, attr, None)  # a lazily imported name is in vars() once used
    public = {
        attr
        for attr, value in vars(module).items()
        if not attr.startswith("_")
        and not isinstance(value, types.ModuleType)
        and (
            isinstance(value, types.UnionType)  # type aliases such as rpc.Event
            or getattr(value, "__module__", "workerloader").startswith("workerloader")
        )
    }
    assert set(module.__all__) == public
    for attr in module.__all__:
        assert hasattr(module, attr)


def test_every_workerloader_error_derives_from_the_root() -> None:
    import workerloader
    from workerloader import _errors

    for attr in _errors.__all__:
        cls = getattr(_errors, attr)
        assert issubclass(cls, workerloader.WorkerloaderError)
