"""``workerloader keys create|list|revoke``: API keys of the service (stored hashed)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from ..server._store import ServiceStore
from ._common import data_dir_option as _data_dir
from ._common import existing_store, option


@click.group()
def keys() -> None:
    """Create, list and revoke API keys. With no key, the service runs in dev mode."""


# A key's namespace is a grant, not the namespace the CLI acts in: its variable is this
# command's own, so a WORKERLOADER_NAMESPACE exported for `workers`/`logs` never widens or
# moves what a new key may touch.
@keys.command("create")
@option(
    "--user",
    "user_id",
    required=True,
    envvar="WORKERLOADER_KEYS_USER",
    help="The user the key acts as.",
)
@option(
    "--namespace",
    default="default",
    show_default=True,
    envvar="WORKERLOADER_KEYS_NAMESPACE",
    help="Its namespace.",
)
@option(
    "--read-only",
    is_flag=True,
    envvar="WORKERLOADER_KEYS_READ_ONLY",
    help="Grant read but not write.",
)
@_data_dir
def create(user_id: str, namespace: str, read_only: bool, data_dir: Path) -> None:
    """Create a key; its secret is printed this once."""
    permissions = ("read",) if read_only else ("read", "write")
    try:
        key = ServiceStore(data_dir).create_key(user_id, namespace, permissions)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--namespace") from None
    click.echo(
        f"id:     {key.id}\nsecret: {key.secret}\n(store the secret now: only a hash is kept)"
    )


@keys.command("list")
@_data_dir
def list_keys(data_dir: Path) -> None:
    """List keys (never their secrets)."""
    table = Table()
    for column in ("id", "user", "namespace", "permissions", "created", "revoked"):
        table.add_column(column)
    for key in existing_store(data_dir).list_keys():
        table.add_row(
            key.id,
            key.user_id,
            key.namespace,
            ",".join(key.permissions),
            dt.datetime.fromtimestamp(key.created).isoformat(timespec="seconds"),
            ""
            if key.revoked is None
            else dt.datetime.fromtimestamp(key.revoked).isoformat(timespec="seconds"),
        )
    Console().print(table)


@keys.command("revoke")
@click.argument("key_id")
@_data_dir
def revoke(key_id: str, data_dir: Path) -> None:
    """Revoke a key by id."""
    if not existing_store(data_dir).revoke(key_id):
        raise click.ClickException(f"no active key {key_id!r}")
    click.echo(f"revoked {key_id}")
