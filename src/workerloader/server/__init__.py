"""The HTTP service: ``create_app`` builds the ASGI app that ``workerloader serve`` runs."""

from ._app import ServerConfig as ServerConfig
from ._app import create_app as create_app

__all__ = ["ServerConfig", "create_app"]
