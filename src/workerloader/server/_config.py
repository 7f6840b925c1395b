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
    [server] log_retention_days  WORKERLOADER_LOG_RETENTION_DAYS   --log-retention-days
    [server] auth                WORKERLOADER_AUTH                 --auth (no dev mode)
    [ai] base_url                WORKERLOADER_AI_BASE_URL          (file or env only)
    [ai] model                   WORKERLOADER_AI_MODEL
    [ai] embedding_model         WORKERLOADER_AI_EMBEDDING_MODEL
    [ai] api_key_env             (names the variable holding the key: the key itself is never
                                 written in the file)
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..bindings import AiConfig
from ._app import ServerConfig

__all__ = ["load_config"]

_SERVER_OPTIONS = {
    "host": str,
    "port": int,
    "data_dir": Path,
    "insecure": bool,
    "pool_size": int,
    "max_concurrent": int,
    "log_retention_days": float,
    "auth": bool,
}


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def load_config(
    path: Path | None,
    flags: Mapping[str, object],
    environ: Mapping[str, str] | None = None,
) -> tuple[ServerConfig, str, int]:
    """The service's config, host and port. ``flags`` holds only the options given on the
    command line (None values are ignored). Raises ValueError naming the bad option."""
    environ = os.environ if environ is None else environ
    file: dict[str, Any] = {}
    if path is not None:
        with open(path, "rb") as f:
            file = tomllib.load(f)
    server = dict(file.get("server", {}))
    unknown = set(server) - set(_SERVER_OPTIONS)
    if unknown:
        raise ValueError(f"{path}: unknown [server] options {sorted(unknown)}")
    values: dict[str, Any] = {"host": "127.0.0.1", "port": 8787, **server}
    for name, kind in _SERVER_OPTIONS.items():
        variable = f"WORKERLOADER_{name.upper()}"
        if variable in environ:
            text = environ[variable]
            values[name] = _boolean(text) if kind is bool else kind(text)
        if flags.get(name) is not None:
            values[name] = flags[name]
    ai = dict(file.get("ai", {}))
    for name in ("base_url", "model", "embedding_model"):
        variable = f"WORKERLOADER_AI_{name.upper()}"
        if variable in environ:
            ai[name] = environ[variable]
    ai_config = None
    if ai.get("base_url") and ai.get("model"):
        key_variable = ai.get("api_key_env", "WORKERLOADER_AI_API_KEY")
        ai_config = AiConfig(
            base_url=ai["base_url"],
            model=ai["model"],
            embedding_model=ai.get("embedding_model"),
            api_key=environ.get(key_variable),
        )
    config = ServerConfig(
        data_dir=Path(values.get("data_dir", ".workerloader")),
        insecure=bool(values.get("insecure", False)),
        pool_size=int(values.get("pool_size", 8)),
        max_concurrent_executions=int(values.get("max_concurrent", 64)),
        log_retention_s=float(values.get("log_retention_days", 7)) * 86400,
        ai=ai_config,
        require_auth=bool(values.get("auth", False)),
    )
    return config, str(values["host"]), int(values["port"])
