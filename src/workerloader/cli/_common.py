"""Options shared by several nouns: one definition, one environment variable.

Every option of every command has an environment variable, shown by ``--help``. An option
several commands share, with one meaning, has one variable for all of them
(``WORKERLOADER_<OPTION>``: ``WORKERLOADER_DATA_DIR``, ``_HOST``, ``_PORT``, ``_INSECURE``,
``_NAMESPACE``, ``_CONFIG``); an option of one command is named after it
(``WORKERLOADER_<COMMAND>_<OPTION>``, e.g. ``WORKERLOADER_EXEC_TIMEOUT_MS``), so a variable
never means two things.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, get_args

import click

from ..loader._loader import valid_namespace
from ..server._store import ServiceStore
from ..server._workers import Binding

if TYPE_CHECKING:
    from ..server import ServerConfig

__all__ = [
    "announce_made_data_dir",
    "binding_option",
    "check_env_and_bindings",
    "config_option",
    "config_path_or_default",
    "data_dir_option",
    "env_option",
    "existing_store",
    "insecure_option",
    "namespace_option",
    "option",
    "service_config",
    "shown",
]

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


config_option = option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=None,
    envvar="WORKERLOADER_CONFIG",
    help="A workerloader.toml (default: ./workerloader.toml if it exists).",
)


def config_path_or_default(config_path: Path | None) -> Path | None:
    """``--config`` as given, else ``./workerloader.toml`` if there is one, else None."""
    if config_path is None and Path("workerloader.toml").exists():
        return Path("workerloader.toml")
    return config_path


def service_config(config_path: Path | None) -> ServerConfig:
    """The config the service would have with this config file (or ./workerloader.toml) and
    the ``WORKERLOADER_*`` variables, for ``dev`` and ``exec`` to give their workers the same
    AI provider (``[ai]``), HTTP gateway (``[bindings.api]``), storage quota and interpreter
    (``sandbox_python``); click.ClickException naming what is wrong in them."""
    from ..server._config import load_config

    try:
        config, _ = load_config(config_path_or_default(config_path), {})
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    return config


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_CONTROL_BUT_NEWLINE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def shown(text: object, *, lines: bool = False) -> str:
    """``text`` as it may reach a terminal: its control characters (escape sequences that
    clear the screen, set the title or the clipboard; carriage returns and backspaces that
    overwrite what is shown) as ``\\x..`` escapes, newlines too unless ``lines``, so one
    record is one line. What workers print or name (logs, errors' types and messages) is
    theirs to choose: never written raw."""
    pattern = _CONTROL_BUT_NEWLINE if lines else _CONTROL
    return pattern.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def _valid_namespace(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return valid_namespace(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


namespace_option = option(
    "--namespace",
    default="default",
    show_default=True,
    envvar="WORKERLOADER_NAMESPACE",
    callback=_valid_namespace,
    help="The namespace to act in.",
)

insecure_option = option(
    "--insecure",
    is_flag=True,
    envvar="WORKERLOADER_INSECURE",
    help="Run workers unconfined where this machine has no sandbox.",
)

sandbox_python_option = option(
    "--sandbox-python",
    default=None,
    envvar="WORKERLOADER_SANDBOX_PYTHON",
    help="The interpreter workers run on; it must import this workerloader (3.12+: workers "
    "share the zygote's memory). [default: the one running workerloader]",
)


def announce_made_data_dir(data_dir: Path) -> None:
    """Say on stderr that ``data_dir`` was made (by ``exec`` or ``workers put``: call it only
    if it did not exist before them): run from another directory than the service, the
    default ./.workerloader is a new, empty one that no service reads, and what the command
    stored there would seem lost."""
    click.echo(
        f"workerloader: made {data_dir}, which did not exist (a service reads its own "
        "--data-dir: give the same one to act on its data)",
        err=True,
    )


def existing_store(data_dir: Path) -> ServiceStore:
    """The service's store in ``data_dir``, for a command that reads or changes what is there:
    click.UsageError if the directory holds none (a mistyped --data-dir, or a command run
    from another directory than `serve`, would otherwise show an empty store and make one)."""
    if not (data_dir / "service.sqlite3").exists():
        raise click.UsageError(
            f"{data_dir} holds no service data (`serve --data-dir {data_dir}` makes it); "
            "give the --data-dir the service uses"
        )
    return ServiceStore(data_dir)


def check_env_and_bindings(env: dict[str, object], bindings: dict[str, Any]) -> None:
    """click.UsageError for a name given as both ``--env`` and ``--binding``: the binding
    would silently replace the data."""
    both = sorted(set(env) & set(bindings))
    if both:
        raise click.UsageError(f"{', '.join(both)}: given as both --env and --binding")


def env_option(envvar: str) -> Callable[[_F], _F]:
    """``--env KEY=VALUE`` (repeatable): data in a worker's env (see ``_parse_env``)."""
    return option(
        "--env",
        "env",
        multiple=True,
        metavar="KEY=VALUE",
        callback=_parse_env,
        envvar=envvar,
        help="Data in the worker's env, repeatable: VALUE is JSON if it parses, else a string.",
    )


def binding_option(envvar: str) -> Callable[[_F], _F]:
    """``--binding NAME=TYPE[:ro]`` (repeatable): a binding in a worker's env."""
    return option(
        "--binding",
        "bindings",
        multiple=True,
        metavar="NAME=TYPE[:ro]",
        callback=_parse_bindings,
        envvar=envvar,
        help=f"A binding in the worker's env, repeatable: TYPE one of {', '.join(_BINDING_TYPES)}"
        " (SDK=sdk gives `from workers import sdk` its sdk.kv, sdk.db, ...); :ro grants read "
        "only.",
    )


_BINDING_TYPES: tuple[str, ...] = get_args(Binding.model_fields["type"].annotation)


def _split_pairs(items: tuple[str, ...], what: str) -> dict[str, str]:
    """``NAME=VALUE`` items as a dict; click.BadParameter for an item with no ``=``, an empty
    name, or a name given twice (a silent last-one-wins would hide a typo)."""
    pairs: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{item!r} is not {what}")
        if name in pairs:
            raise click.BadParameter(f"{name} is given twice")
        pairs[name] = value
    return pairs


def _parse_env(ctx: click.Context, param: click.Parameter, items: tuple[str, ...]) -> Any:
    """``--env KEY=VALUE`` items as the definition's ``env``: VALUE as JSON if it parses
    (``N=3`` is the number 3, ``ON=true`` a boolean, ``L=[1,2]`` a list), else as the string
    it is (``NAME=ada``); quote a string that looks like JSON: ``ID='"3"'``. ``NaN`` and
    ``Infinity`` are not JSON, so strings; a number too large for a float (``1e999``) is
    refused: stored, it could never be read back as JSON."""
    env: dict[str, object] = {}
    for name, text in _split_pairs(items, "KEY=VALUE").items():
        try:
            env[name] = json.loads(text, parse_constant=_not_json, parse_float=_finite)
        except OverflowError:
            raise click.BadParameter(f"{name}: {text} is beyond a float's range") from None
        except ValueError:
            env[name] = text
    return env


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise OverflowError(text)
    return value


def _parse_bindings(ctx: click.Context, param: click.Parameter, items: tuple[str, ...]) -> Any:
    """``--binding NAME=TYPE[:ro]`` items as the definition's ``bindings``: ``SDK=sdk`` is
    ``{"SDK": {"type": "sdk"}}``, ``DB=db:ro`` is ``{"DB": {"type": "db", "write": false}}``."""
    bindings: dict[str, dict[str, object]] = {}
    for name, spec in _split_pairs(items, "NAME=TYPE").items():
        kind, _, mode = spec.partition(":")
        if kind not in _BINDING_TYPES:
            raise click.BadParameter(
                f"{name}: {kind!r} is not a binding type ({', '.join(_BINDING_TYPES)})"
            )
        if mode not in ("", "ro"):
            raise click.BadParameter(f"{name}: {mode!r} is not a mode (only :ro)")
        bindings[name] = {"type": kind, **({"write": False} if mode == "ro" else {})}
    return bindings
