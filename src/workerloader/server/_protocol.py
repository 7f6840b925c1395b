"""The HTTP server's connections, bounded before the app sees a request.

uvicorn's httptools protocol keeps every byte of a request head (request line and headers)
until the head is complete, however long that takes: one client sending an endless header
grew the service by its size (200 MB sent, 200 MB held), and a client that opens a
connection and sends nothing, or one byte now and then, holds it forever. ``SizeCap`` (431)
only runs once the head is complete, so it cannot bound either. ``BoundedHttpProtocol`` does,
on the connection: a head past ``MAX_HEAD_BYTES`` is answered 431 and a head not complete
``HEAD_TIMEOUT_S`` after its connection opened (or its previous response ended) 408, in the
service's error shape, and the connection closed.

Connections are bounded in number too: each holds a file descriptor (and a protocol object)
until its head times out, and a client opening them without end ran the process out of
descriptors, after which no worker could start, for any tenant. A connection arriving while
``max_connections`` are open is answered 503 at once and closed.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from ._app import MAX_HEADER_BYTES

__all__ = [
    "HEAD_TIMEOUT_S",
    "LINGER_S",
    "MAX_CONNECTIONS",
    "MAX_HEAD_BYTES",
    "MAX_LINGERING_REFUSALS",
    "BoundedHttpProtocol",
    "capped",
]

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

# The default leaves room for the workers under the kernel's default hard limit on open
# files, 4,096 (what a process gets where nothing raises it; systemd and container runtimes
# commonly allow 524,288 or more, and the host lifts its soft limit to the hard one): a
# thousand live workers (Loader's max_workers) hold ~3,000 descriptors, three each; the
# service's own were 17 idle and 28 beside 20 live workers (measured). 512 connections and
# 64 lingering refusals leave ~490 for the rest: databases opened as they are used (three
# each, with their WAL), outbound HTTP. 1,024 connections would not fit. No client needs
# hundreds: uvicorn closes an idle keep-alive connection after 5 s, and a proxy pools a few.
MAX_CONNECTIONS = 512
"""Connections a server holds open at once (``[server] max_connections``): one more is
answered 503 and closed."""

MAX_LINGERING_REFUSALS = 64
"""Connections refused at the cap that may linger at once (see ``LINGER_S``): past these, a
refusal is written and the connection closed without waiting, its answer perhaps lost to a
reset. A client that reads its refusal and closes frees its place within a round trip; one
that does neither would otherwise hold a descriptor for ``LINGER_S`` per connection it
opens, and at a few thousand connections a second that is the descriptors the cap saves."""


def _refusal(status: int, kind: str, message: str, retry_after_s: int | None = None) -> bytes:
    """A whole HTTP response in the service's error shape (see ``error_answer``), with a
    ``retry-after`` header if ``retry_after_s`` is given."""
    body = json.dumps({"ok": False, "error": {"type": kind, "message": message}}).encode()
    retry = b"" if retry_after_s is None else b"retry-after: %d\r\n" % retry_after_s
    head = (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"%sconnection: close\r\n\r\n"
        % (status, HTTPStatus(status).phrase.encode(), len(body), retry)
    )
    return head + body


class _Tally:
    """One server's open connections, by how each is counted (see ``BoundedHttpProtocol``)."""

    __slots__ = ("lingering", "served")

    def __init__(self) -> None:
        self.served = 0  # taken under the cap, whatever became of them since (a 431 too)
        self.lingering = 0  # refused at the cap, their 503 going out (MAX_LINGERING_REFUSALS)


_TALLIES: weakref.WeakKeyDictionary[ServerState, _Tally] = weakref.WeakKeyDictionary()
"""Each server's tally, by its ``ServerState``: uvicorn makes one per server and hands it to
every connection's protocol, so servers sharing a protocol class in one process (tests run
many) are counted apart."""


class _Coalescing:
    """A connection's transport that sends a response's head together with the body that
    follows it: uvicorn writes the status line and headers, then the body, each with a send of
    its own, and on loopback each send costs ~25 µs and wakes the client once more.

    A write that starts a response head is held; the next write goes out joined to it, and a
    head still held at the end of the event loop's turn (a streamed body whose first chunk
    is not ready) goes out alone then. Closing, or ending the sending side, sends it first;
    aborting drops it."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._held is not None:
            data, self._held = self._held + data, None
        elif isinstance(data, bytes) and data.startswith(b"HTTP/1."):
            self._held = data
            self._loop.call_soon(self._flush)
            return
        self._transport.write(data)

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def _flush(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    # Called for every request: forwarded without a trip through __getattr__.
    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with its request heads bounded in size and time.

    A head's bytes are counted as they arrive, after the parser has taken them: a chunk that
    completes the head resets the count, so a body sent with its head never counts, nor does
    the read a head begins in. Memory held for a head is then at most ``max_head_bytes`` and
    two reads.

    Time: one timer per connection, which on firing compares the clock with when the wait
    for a head began (or, while a body comes, with its last read) and sets itself again if
    time is left (a timer set and cancelled for every request cost ~3% of warm
    requests/s).

    Number: a server holds at most ``max_connections`` open, each counted from
    ``connection_made`` to ``connection_lost`` (one refused 431 or 408 too, until it closes:
    it holds its descriptor as long). One arriving past them is answered 503 at once and
    closed, lingering as the other refusals do, and is not counted: counting it would keep
    the next client out for up to ``LINGER_S`` after a place came free, and bound nothing,
    since it is open either way. ``max_lingering_refusals`` bounds those: past that many
    lingering, a refusal closes at once. In all, ``max_connections + max_lingering_refusals``
    descriptors (and, for a moment, what one wake of asyncio's accept loop takes: up to
    uvicorn's backlog). The count is our own: uvicorn's ``server_state.connections`` holds the
    refused connections too (its ``limit_concurrency`` reads that set, to answer requests 503
    on connections it keeps open).

    The bounds are class attributes; ``capped`` makes a class with another cap (uvicorn makes
    each connection's protocol itself, from the class it is given)."""

    max_head_bytes = MAX_HEAD_BYTES
    head_timeout_s = HEAD_TIMEOUT_S
    max_connections = MAX_CONNECTIONS
    max_lingering_refusals = MAX_LINGERING_REFUSALS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading_head = False  # from a request's first byte to its last header
        self._head_bytes = 0
        self._waiting_since = 0.0  # when the connection began to owe a head (loop time)
        self._last_data = 0.0  # when bytes last came in (loop time)
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False  # a refusal is sent: what comes in is dropped until the close
        self._pending_refusal: bytes | None = None  # waits for the answer going out
        tally = _TALLIES.get(self.server_state)
        if tally is None:
            tally = _TALLIES[self.server_state] = _Tally()
        self._tally = tally
        self._served = False  # counted in the tally's served until connection_lost
        self._lingering = False  # counted in the tally's lingering until connection_lost

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # Every write of the connection goes through it, the protocol's own (refusals) too,
        # so that none overtakes a held head.
        super().connection_made(_Coalescing(transport, self.loop))  # type: ignore[arg-type]
        if self._tally.served >= self.max_connections:
            self._refuse_connection()
            return
        self._tally.served += 1
        self._served = True
        self._waiting_since = self.loop.time()
        self._timer = self.loop.call_later(self.head_timeout_s, self._check_time)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._served:
            self._tally.served -= 1
        elif self._lingering:
            self._tally.lingering -= 1
        if self._timer is not None:
            self._timer.cancel()
        super().connection_lost(exc)

    def _refuse_connection(self) -> None:
        """Answer a connection past ``max_connections`` 503 and close it: lingering if fewer
        than ``max_lingering_refusals`` do, else at once."""
        message = (
            f"too many connections open: the service holds at most {self.max_connections} "
            "(max_connections); retry later, or close idle ones"
        )
        response = _refusal(503, "TooManyConnections", message, retry_after_s=1)
        if self._tally.lingering < self.max_lingering_refusals:
            self._tally.lingering += 1
            self._lingering = True
            self._refuse(response)
            return
        # Sent whole if the socket takes it (a client that sent nothing yet reads it all);
        # the close may reset the connection if the client did send something first.
        self._refused = True
        self.transport.write(response)
        self.transport.close()

    def _unsupported_upgrade_warning(self) -> None:
        # The service takes no upgrades (serve and dev run with ws="none"): a request asking
        # for one is answered as any other. uvicorn would log two warnings for each (one
        # telling the operator to install a WebSocket library), which any client could
        # repeat to flood the log.
        self.logger.debug("upgrade header ignored: this service takes no upgrades")

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


def capped(max_connections: int) -> type[BoundedHttpProtocol]:
    """``BoundedHttpProtocol`` with at most ``max_connections`` open: the class to give uvicorn
    (``http=``) for a server with that cap."""

    class Capped(BoundedHttpProtocol):
        pass

    Capped.max_connections = max_connections
    return Capped
