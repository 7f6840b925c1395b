"""docs/http-api.md lists exactly the operations the OpenAPI document has: a route added or
removed without its line in the docs fails here."""

from __future__ import annotations

import re
from pathlib import Path

from workerloader.server import ServerConfig, create_app

DOC = Path(__file__).resolve().parents[2] / "docs" / "http-api.md"


def _shape(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "{}", path)


def test_the_http_api_page_lists_every_operation_and_no_other(tmp_path: Path) -> None:
    spec = create_app(ServerConfig(data_dir=tmp_path)).openapi()
    served = {
        (method.upper(), _shape(path)) for path, item in spec["paths"].items() for method in item
    }
    table = "\n".join(
        line for line in DOC.read_text().splitlines() if line.startswith(("| `", "| any `"))
    )
    documented = {
        (method, _shape(path)) for method, path in re.findall(r"`([A-Z]+) (/[^`]*)`", table)
    }
    for path in re.findall(r"any `(/[^`]*)`", table):  # every method the proxy accepts
        documented |= {(method, _shape(path)) for method, p in served if p == _shape(path)}
    assert documented == served
