"""Building ``ServerConfig`` from its three sources: the config file, the environment, flags.

Precedence: a command-line flag beats an environment variable, which beats the file, which
beats the default. Every option has one name in each source::

    workerloader.toml            environment                       flag
    [server] host                WORKERLOADER_HOST                 --host
    [server] port                WORKERLOADER_PORT                 --port
    [server] data_dir            WORKERLOADER_DATA_DIR             --data-dir
    [server] insecure            WORKERLOADER_INSECURE             --insecure
    [server] pool_size           WORKERLOADER_POOL_SIZE            --pool-size
    [server] max_concurrent      WORKERLOADER_MAX_CONCURRENT       --max-concurrent
    [server] max_connections     WORKERLOADER_MAX_CONNECTIONS      --max-connections
    [server] log_retention_days  WORKERLOADER_LOG_RETENTION_DAYS   --log-retention-days
    [server] log_max_mb          WORKERLOADER_LOG_MAX_MB           --log-max-mb
    [server] storage_quota_mb    WORKERLOADER_STORAGE_QUOTA_MB     --storage-quota-mb (0: none)
    [server] auth                WORKERLOADER_AUTH                 --auth (no dev mode)
    [server] sandbox_python      WORKERLOADER_SANDBOX_PYTHON       --sandbox-python
    [ai] base_url                WORKERLOADER_AI_BASE_URL          (file or env only; both
    [ai] model                   WORKERLOADER_AI_MODEL              or neither: no AI then)
    [ai] embedding_model         WORKERLOADER_AI_EMBEDDING_MODEL
    [ai] api_key_env             (names the variable holding the key: the key itself is never
                                 written in the file)
    [limits] cpu_ms              WORKERLOADER_LIMITS_CPU_MS        (file or env only)
    [limits] memory_mb           WORKERLOADER_LIMITS_MEMORY_MB
    [limits] wall_ms             WORKERLOADER_LIMITS_WALL_MS
    [bindings.api] allow         WORKERLOADER_API_ALLOW (comma-separated host patterns)
    [bindings.api] allow_private WORKERLOADER_API_ALLOW_PRIVATE

``[limits]`` are the defaults of ``POST /execute`` workers (a request's ``limits`` and
``timeout_ms`` override them). ``[bindings.api]`` makes the HTTP gateway that ``/execute`` code
gets as ``api`` (``sdk.api``) and stored workers get through ``sdk`` and ``api`` bindings; without
it they have no outbound HTTP. ``max_connections`` is the HTTP server's, as host and port are,
not the app's: it is in ``Listen``, not ``ServerConfig``. An unknown section or option is an
error, not ignored.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..bindings import AiConfig, HttpGateway
from ..loader._loader import DEFAULT_STORAGE_QUOTA_MB
from ._app import ExecuteLimits, ServerConfig
from ._protocol import MAX_CONNECTIONS

__all__ = ["Listen", "load_config"]

_SERVER_OPTIONS = {
    "host": str,
    "port": int,
    "data_dir": Path,
    "insecure": bool,
    "pool_size": int,
    "max_concurrent": int,
    "max_connections": int,
    "log_retention_days": float,
    "log_max_mb": int,
    "storage_quota_mb": int,
    "auth": bool,
    "sandbox_python": str,
}


def _quota(value: int) -> int | None:
    """``storage_quota_mb``: None (no quota) for 0."""
    if value < 0:
        raise ValueError(
            "storage_quota_mb must be at least 0 (0: no quota; from --storage-quota-mb, "
            f"WORKERLOADER_STORAGE_QUOTA_MB or [server] storage_quota_mb): {value}"
        )
    return int(value) or None


def _at_least_one(name: str, value: int) -> int:
    if value < 1:
        raise ValueError(
            f"{name} must be at least 1 (from --{name.replace('_', '-')}, "
            f"WORKERLOADER_{name.upper()} or [server] {name}): {value}"
        )
    return int(value)


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


@dataclass(frozen=True)
class Listen:
    """How the HTTP server takes connections: uvicorn's options, not the app's."""

    host: str = "127.0.0.1"
    port: int = 8787
    max_connections: int = MAX_CONNECTIONS
    """Connections open at once; one more is answered 503 and closed (see ``_protocol``)."""


def load_config(
    path: Path | None,
    flags: Mapping[str, object],
    environ: Mapping[str, str] | None = None,
) -> tuple[ServerConfig, Listen]:
    """The service's config and how it listens. ``flags`` holds only the options given on the
    command line (None values are ignored). Raises ValueError naming the bad option."""
    environ = os.environ if environ is None else environ
    file: dict[str, Any] = {}
    if path is not None:
        with open(path, "rb") as f:
            try:
                file = tomllib.load(f)
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"{path}: not TOML: {exc}") from None
    _known(path, "", file, {"server", "ai", "limits", "bindings"})
    server = dict(file.get("server", {}))
    _known(path, "server", server, set(_SERVER_OPTIONS))
    values: dict[str, Any] = {"host": "127.0.0.1", "port": 8787}
    for name, kind in _SERVER_OPTIONS.items():
        variable = f"WORKERLOADER_{name.upper()}"
        if name in server:
            values[name] = _typed(server[name], kind, f"{path}: [server] {name}")
        if variable in environ:
            text = environ[variable]
            try:
                values[name] = _boolean(text) if kind is bool else kind(text)
            except ValueError:
                raise ValueError(f"{variable}={text!r}: not {_KINDS[kind][1]}") from None
        if flags.get(name) is not None:
            values[name] = flags[name]
    ai = dict(file.get("ai", {}))
    for name in ("base_url", "model", "embedding_model"):
        variable = f"WORKERLOADER_AI_{name.upper()}"
        if variable in environ:
            ai[name] = environ[variable]
    ai_config = None
    given = [name for name in ("base_url", "model") if ai.get(name)]
    if len(given) == 1:
        missing = "model" if given == ["base_url"] else "base_url"
        raise ValueError(
            f"[ai] {given[0]} is set but {missing} is not: the AI provider needs both "
            f"([ai] {missing} in {path or 'workerloader.toml'}, or "
            f"WORKERLOADER_AI_{missing.upper()})"
        )
    if given:
        key_variable = ai.get("api_key_env", "WORKERLOADER_AI_API_KEY")
        ai_config = AiConfig(
            base_url=ai["base_url"],
            model=ai["model"],
            embedding_model=ai.get("embedding_model"),
            api_key=environ.get(key_variable),
        )
    _known(path, "ai", ai, {"base_url", "model", "embedding_model", "api_key_env"})
    config = ServerConfig(
        data_dir=Path(values.get("data_dir", ".workerloader")),
        insecure=bool(values.get("insecure", False)),
        pool_size=int(values.get("pool_size", 32)),
        max_concurrent_executions=int(values.get("max_concurrent", 64)),
        log_retention_s=float(values.get("log_retention_days", 7)) * 86400,
        log_max_bytes=_at_least_one("log_max_mb", values.get("log_max_mb", 1024)) << 20,
        storage_quota_mb=_quota(values.get("storage_quota_mb", DEFAULT_STORAGE_QUOTA_MB)),
        ai=ai_config,
        require_auth=bool(values.get("auth", False)),
        sandbox_python=values.get("sandbox_python") or None,
        execute_limits=_limits(path, dict(file.get("limits", {})), environ),
        api=_gateway(path, dict(file.get("bindings", {})), environ),
    )
    listen = Listen(
        host=str(values["host"]),
        port=int(values["port"]),
        max_connections=_at_least_one(
            "max_connections", values.get("max_connections", MAX_CONNECTIONS)
        ),
    )
    return config, listen


_KINDS: dict[type, tuple[type | tuple[type, ...], str]] = {
    str: (str, "a string"),
    int: (int, "an integer"),
    float: ((int, float), "a number"),
    bool: (bool, "a boolean"),
    Path: (str, "a path (a string)"),
}
"""Each option type: the TOML values that may give it, and its name in an error."""


def _typed(value: object, kind: type, where: str) -> object:
    """A config file's ``value`` for an option of type ``kind``; ValueError naming ``where``
    if TOML gave another type (``port = "abc"``; a boolean is no number here)."""
    accepted, name = _KINDS[kind]
    if not isinstance(value, accepted) or (isinstance(value, bool) and kind is not bool):
        raise ValueError(f"{where}: {value!r} is not {name}")
    return value


def _known(path: Path | None, section: str, table: Mapping[str, object], names: set[str]) -> None:
    unknown = set(table) - names
    if unknown:
        where = f"[{section}] options" if section else "sections"
        raise ValueError(f"{path}: unknown {where} {sorted(unknown)}")


def _limits(path: Path | None, table: dict[str, Any], environ: Mapping[str, str]) -> ExecuteLimits:
    """``POST /execute``'s default limits: the file's ``[limits]``, then the environment."""
    _known(path, "limits", table, set(ExecuteLimits.model_fields))
    source = {name: f"{path}: [limits] {name}" for name in table}
    for name in ExecuteLimits.model_fields:
        variable = f"WORKERLOADER_LIMITS_{name.upper()}"
        if variable in environ:
            table[name] = environ[variable]
            source[name] = f"{variable}={environ[variable]!r}"
    try:
        return ExecuteLimits.model_validate(table)
    except ValidationError as exc:
        problem = exc.errors()[0]
        name = str(problem["loc"][0]) if problem["loc"] else ""
        raise ValueError(f"{source.get(name, '[limits]')}: {problem['msg']}") from None


def _gateway(
    path: Path | None, bindings: dict[str, Any], environ: Mapping[str, str]
) -> HttpGateway | None:
    """The HTTP gateway from ``[bindings.api]`` and the environment; None if neither gives
    hosts to allow."""
    _known(path, "bindings", bindings, {"api"})
    api = dict(bindings.get("api", {}))
    _known(path, "bindings.api", api, {"allow", "allow_private"})
    if "WORKERLOADER_API_ALLOW" in environ:
        api["allow"] = [
            p.strip() for p in environ["WORKERLOADER_API_ALLOW"].split(",") if p.strip()
        ]
    if "WORKERLOADER_API_ALLOW_PRIVATE" in environ:
        api["allow_private"] = _boolean(environ["WORKERLOADER_API_ALLOW_PRIVATE"])
    allow = api.get("allow", [])
    if not isinstance(allow, list) or not all(isinstance(p, str) for p in allow):
        raise ValueError("[bindings.api] allow: a list of host patterns")
    allow_private = api.get("allow_private", False)
    if not isinstance(allow_private, bool):  # "false" would be true
        raise ValueError("[bindings.api] allow_private: true or false (a TOML boolean)")
    if not allow:
        return None
    return HttpGateway(allow, allow_private=allow_private)
