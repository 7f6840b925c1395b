"""The HTTP server's connections, bounded before the app sees a request.

uvicorn's httptools protocol keeps every byte of a request head (request line and headers)
until the head is complete, however long that takes: one client sending an endless header
grew the service by its size (200 MB sent, 200 MB held), and a client that opens a
connection and sends nothing, or one byte now and then, holds it forever. ``SizeCap`` (431)
only runs once the head is complete, so it cannot bound either. ``BoundedHttpProtocol`` does,
on the connection: a head past ``MAX_HEAD_BYTES`` is answered 431 and a head not complete
``HEAD_TIMEOUT_S`` after its connection opened (or its previous response ended) 408, in the
service's error shape, and the connection closed.
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ._app import MAX_HEADER_BYTES

__all__ = ["HEAD_TIMEOUT_S", "LINGER_S", "MAX_HEAD_BYTES", "BoundedHttpProtocol"]

MAX_HEAD_BYTES = 2 * MAX_HEADER_BYTES
"""A request line and headers as sent, with their separators: past this, 431 and the
connection closes. (Headers alone past ``MAX_HEADER_BYTES`` are 431 from ``SizeCap``.)"""

HEAD_TIMEOUT_S = 30.0
"""How long a connection may take to send a request's head: from its opening, or from the
end of its previous response (uvicorn closes an idle keep-alive connection sooner); and how
long a request's body may pause between two reads."""

LINGER_S = 2.0
"""After refusing a request, how long the connection goes on reading (and dropping) what the
client still sends before it closes: closed with unread data, a socket resets the connection,
and the client's kernel would throw the refusal away unread."""


def _refusal(status: int, kind: str, message: str) -> bytes:
    """A whole HTTP response in the service's error shape (see ``error_answer``)."""
    body = json.dumps({"ok": False, "error": {"type": kind, "message": message}}).encode()
    head = (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n" % (status, HTTPStatus(status).phrase.encode(), len(body))
    )
    return head + body


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with its request heads bounded in size and time.

    A head's bytes are counted as they arrive, after the parser has taken them: a chunk that
    completes the head resets the count, so a body sent with its head never counts, nor does
    the read a head begins in. Memory held for a head is then at most ``max_head_bytes`` and
    two reads.

    Time: one timer per connection, which on firing compares the clock with when the wait
    for a head began (or, while a body comes, with its last read) and sets itself again if
    time is left (a timer set and cancelled for every request cost ~3% of warm
    requests/s)."""

    max_head_bytes = MAX_HEAD_BYTES
    head_timeout_s = HEAD_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading_head = False  # from a request's first byte to its last header
        self._head_bytes = 0
        self._waiting_since = 0.0  # when the connection began to owe a head (loop time)
        self._last_data = 0.0  # when bytes last came in (loop time)
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False  # a refusal is sent: what comes in is dropped until the close
        self._pending_refusal: bytes | None = None  # waits for the answer going out

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._waiting_since = self.loop.time()
        self._timer = self.loop.call_later(self.head_timeout_s, self._check_time)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._last_data = self.loop.time()
        head_under_way = self._reading_head
        super().data_received(data)
        if not self._reading_head or self.transport.is_closing():
            return
        # A read in which a head began is not counted: most of it may be the previous
        # request's body. A head is then held to at most max_head_bytes and two reads.
        self._head_bytes += len(data) if head_under_way else 0
        if self._head_bytes > self.max_head_bytes:
            message = f"a request line and headers are limited to {self.max_head_bytes} bytes"
            self._refuse(_refusal(431, "RequestHeaderFieldsTooLarge", message))

    def on_message_begin(self) -> None:
        if self._busy():  # a pipelined request: its time runs from its first byte
            self._waiting_since = self.loop.time()
        super().on_message_begin()
        self._reading_head = True
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._reading_head = False
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        self._waiting_since = self.loop.time()  # the next request's time runs from here
        super().on_response_complete()
        # Only once every request before the refused head has its answer: a pipelined one
        # just started (its cycle runs) would otherwise read the refusal as its own.
        if self._pending_refusal is not None and not self._busy() and not self.pipeline:
            response, self._pending_refusal = self._pending_refusal, None
            self._send_refusal(response)

    def _busy(self) -> bool:
        """Whether a request is being answered (no head is owed while it is, but the next
        pipelined one's)."""
        return self.cycle is not None and not self.cycle.response_complete

    def _check_time(self) -> None:
        if self._refused or self.transport.is_closing():
            self._timer = None
            return
        left = self.head_timeout_s
        if self._reading_head or not self._busy():
            left -= self.loop.time() - self._waiting_since
        elif self.cycle.more_body:  # a body still coming: the pause since its last bytes
            left -= self.loop.time() - self._last_data
        if left > 0:
            self._timer = self.loop.call_later(left, self._check_time)
            return
        self._timer = None
        if not self._reading_head:
            # Between requests with none begun, or a body that stopped coming: closed (the
            # handler waiting for the body learns that the client is gone).
            self.transport.close()
            return
        message = f"a request's head must arrive within {self.head_timeout_s:g} s"
        self._refuse(_refusal(408, "RequestTimeout", message))

    def _refuse(self, response: bytes) -> None:
        """Answer ``response`` and end the connection; what comes in from now on is dropped.
        While an earlier request on the connection is still being answered (pipelining),
        the refusal waits for that answer to go out first."""
        self._refused = True
        if self._busy():
            self._pending_refusal = response
        else:
            self._send_refusal(response)

    def _send_refusal(self, response: bytes) -> None:
        """Send ``response``, end the sending side, and close once the client has stopped
        sending or ``LINGER_S`` passed (a lingering close)."""
        if self.transport.is_closing():
            return
        self.transport.write(response)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)
