"""Options shared by several nouns: one definition, one environment variable.

Every option of every command has an environment variable, shown by ``--help``. An option
several commands share, with one meaning, has one variable for all of them
(``WORKERLOADER_<OPTION>``: ``WORKERLOADER_DATA_DIR``, ``_HOST``, ``_PORT``, ``_INSECURE``,
``_NAMESPACE``, ``_CONFIG``); an option of one command is named after it
(``WORKERLOADER_<COMMAND>_<OPTION>``, e.g. ``WORKERLOADER_EXEC_TIMEOUT_MS``), so a variable
never means two things.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

__all__ = ["data_dir_option", "insecure_option", "namespace_option", "option"]

_F = TypeVar("_F", bound=Callable[..., Any])


def option(*param_decls: str, envvar: str, **attrs: Any) -> Callable[[_F], _F]:
    """``click.option`` that requires an environment variable and shows it in ``--help``."""
    decorator: Callable[[_F], _F] = click.option(
        *param_decls, envvar=envvar, show_envvar=True, **attrs
    )
    return decorator


data_dir_option = option(
    "--data-dir",
    default=".workerloader",
    show_default=True,
    type=click.Path(path_type=Path),
    envvar="WORKERLOADER_DATA_DIR",
    help="Where KV, SQL, documents, blobs, keys, workers and logs live.",
)

namespace_option = option(
    "--namespace",
    default="default",
    show_default=True,
    envvar="WORKERLOADER_NAMESPACE",
    help="The namespace to act in.",
)

insecure_option = option(
    "--insecure",
    is_flag=True,
    envvar="WORKERLOADER_INSECURE",
    help="Run workers unconfined where this machine has no sandbox.",
)
