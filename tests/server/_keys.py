"""API keys as a test's requests carry them."""

from __future__ import annotations

from workerloader.server._store import ApiKey, ServiceStore


def bearer(key: ApiKey) -> dict[str, str]:
    """The ``Authorization`` header of ``key``."""
    return {"authorization": f"Bearer {key.secret}"}


def new_key_header(
    store: ServiceStore,
    user: str,
    namespace: str,
    permissions: tuple[str, ...] = ("read", "write"),
) -> dict[str, str]:
    """The ``Authorization`` header of a new key of ``user`` in ``namespace``."""
    return bearer(store.create_key(user, namespace, permissions))
