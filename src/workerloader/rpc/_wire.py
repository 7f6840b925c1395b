"""Messages and framing of ``docs/protocol.md`` §1–2: frozen, tagged msgspec structs."""

from __future__ import annotations

import struct
from typing import Final

import msgspec

from .._errors import ProtocolError

__all__ = [
    "PROTOCOL_VERSION",
    "Abort",
    "Hello",
    "Message",
    "Pull",
    "Push",
    "Reject",
    "Release",
    "Resolve",
    "WireError",
    "decode_message",
    "encode_frame",
]

PROTOCOL_VERSION: Final = 1
"""The version this code speaks; docs/protocol.md §8."""

MIN_PROTOCOL_VERSION: Final = 1
"""The oldest peer version this code accepts."""

HEADER: Final = struct.Struct(">I")

WireError = tuple[str, str, "str | None"]
"""``(type name, message, traceback or None)`` as sent in Reject and Abort."""


class Hello(msgspec.Struct, array_like=True, frozen=True, tag=0):
    version: int
    max_frame_bytes: int


class Push(msgspec.Struct, array_like=True, frozen=True, tag=1):
    id: int
    target: int
    path: list[str | int]
    args: object
    pull: bool


class Pull(msgspec.Struct, array_like=True, frozen=True, tag=2):
    id: int


class Resolve(msgspec.Struct, array_like=True, frozen=True, tag=3):
    id: int
    value: object


class Reject(msgspec.Struct, array_like=True, frozen=True, tag=4):
    id: int
    error: tuple[str, str, str | None]


class Release(msgspec.Struct, array_like=True, frozen=True, tag=5):
    id: int
    refcount: int


class Abort(msgspec.Struct, array_like=True, frozen=True, tag=6):
    error: tuple[str, str, str | None]


Message = Hello | Push | Pull | Resolve | Reject | Release | Abort

_encoder: Final = msgspec.msgpack.Encoder()


def _no_extensions(code: int, data: memoryview) -> object:
    raise ProtocolError(f"invalid message from peer: msgpack extension type {code}")


_decoder: Final = msgspec.msgpack.Decoder(Message, ext_hook=_no_extensions)


def encode_frame(message: Message) -> bytes:
    """Encode one message as a length-prefixed frame (the caller checks the size limit).

    Raises MemoryError if the process runs out of memory meanwhile. Encoded into a buffer:
    msgspec's ``encode`` crashed the process (SIGSEGV) when growing its output failed under
    RLIMIT_AS (a 30 MB string, 64 MB allowed), where ``encode_into`` raises MemoryError.
    """
    frame = bytearray(HEADER.size)
    _encoder.encode_into(message, frame, HEADER.size)
    HEADER.pack_into(frame, 0, len(frame) - HEADER.size)
    return bytes(frame)  # one copy, as the header's concatenation took before


def decode_message(body: bytes | memoryview) -> Message:
    """Decode one frame body.

    Raises:
        ProtocolError: the body is not a valid message (unknown kind, wrong field types, an
            extension type, nesting beyond the decoder's own guard).
    """
    try:
        message: Message = _decoder.decode(body)
        return message
    except ProtocolError:
        raise
    except (msgspec.DecodeError, RecursionError, ValueError) as exc:  # incl. bad UTF-8
        raise ProtocolError(f"invalid message from peer: {exc}") from None
