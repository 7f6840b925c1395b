"""What HTTP allows in a response's status and headers.

Checked where a worker makes a ``Response`` (a mistake there is its code's error, with its
line) and again by the host as the response arrives (a hostile worker skips the first check):
a status or header HTTP cannot carry must never reach the service's HTTP server.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["response_problem"]

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")  # RFC 9110: no CR, LF, NUL or controls


def response_problem(status: object, headers: Mapping[str, str]) -> str | None:
    """Why ``status`` and ``headers`` cannot be an HTTP response's, or None if they can: the
    status must be an int in 200-599 (as the Fetch API's ``Response`` requires), each header
    name an HTTP token and each value Latin-1 text without line breaks or control
    characters."""
    if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status <= 599:
        return f"status {status!r} is not an int in 200-599"
    for name, value in headers.items():
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            return f"header name {name!r} is not an HTTP token"
        if not isinstance(value, str) or not _FIELD_VALUE.fullmatch(value):
            return (
                f"header {name!r} has a value HTTP cannot carry ({value!r}: Latin-1 text "
                "without line breaks or control characters)"
            )
    return None
