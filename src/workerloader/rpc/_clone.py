"""Structured clone: Python values to and from the msgpack-ready wire tree (protocol §4).

``encode_value`` turns a value into a tree of msgpack-native objects (it does not produce bytes; the
message codec does that in one pass for the whole frame). ``decode_value`` does the reverse on a
tree that msgspec decoded from a hostile peer, without recursion, under ``RpcLimits``.

Capabilities are not this module's business: the caller passes an ``export`` hook, asked about
every object that is not clonable data, and an ``import_`` hook, given every capability tag.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import uuid
from collections.abc import Callable
from typing import Any, Final

from .._errors import DataCloneError, ProtocolError
from ._limits import RpcLimits

__all__ = ["Export", "Import", "decode_value", "encode_value", "flat_scalars"]

# Tags of the single-entry int-keyed maps; docs/protocol.md §4 is the table.
T_REF: Final = 0
T_DICT: Final = 1
T_TUPLE: Final = 2
T_SET: Final = 3
T_FROZENSET: Final = 4
T_BYTEARRAY: Final = 5
T_BIGINT: Final = 7
T_DATETIME: Final = 8
T_DATE: Final = 9
T_TIME: Final = 10
T_TIMEDELTA: Final = 11
T_DECIMAL: Final = 12
T_UUID: Final = 13
T_EXPORT: Final = 20
T_IMPORT: Final = 21
T_ANSWER: Final = 22

_INT_MIN: Final = -(1 << 63)
_INT_END: Final = 1 << 64

Export = Callable[[object], "dict[int, int] | None"]
"""Maps a non-data object to its capability wire form, or ``None`` if it is not a capability."""

Import = Callable[[int, int], object]
"""Maps a capability tag and id from the peer to the local object (stub or own export)."""


def flat_scalars(items: list[object], limits: RpcLimits) -> bool:
    """True if ``items`` is a list of msgpack-native scalars that needs no encoding or decoding.

    The fast path for the common call ``f(1, "a")``: such a list is its own wire form.
    """
    if len(items) > limits.max_collection_len:
        return False
    for v in items:
        t = type(v)
        if t is str or t is float or t is bool or v is None or t is bytes:
            continue
        if t is int and _INT_MIN <= v < _INT_END:  # type: ignore[operator]
            continue
        return False
    return True


def encode_value(value: object, root: str, export: Export | None, limits: RpcLimits) -> object:
    """Encode ``value`` into a wire tree; ``export`` numbers the capabilities in it (None:
    data only, a capability is a DataCloneError).

    Raises:
        DataCloneError: a part of ``value`` cannot be cloned or exceeds a limit. The message starts
            with the path from ``root`` to it: ``env['CONF']['hook']: cannot clone a generator``.
    """
    t = type(value)
    if t is str or t is float or t is bool or value is None or t is bytes:
        return value
    encoder = _Encoder(export, limits)
    try:
        return encoder.walk(value, 0)
    except _CloneFailure as failure:
        path = root + "".join(reversed(failure.path))
        raise DataCloneError(f"{path}: {failure.reason}") from None


class _CloneFailure(Exception):
    """Internal: carries the failing reason up the recursion, collecting the path on the way."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.path: list[str] = []


def _describe(value: object, capabilities: bool) -> str:
    name = type(value).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    hint = ""
    if not capabilities:
        hint = " (only data can cross here: no functions, stubs or RpcTarget instances)"
    elif not isinstance(value, type) and type(value).__module__ not in ("builtins",):
        hint = " (only data, RpcTarget instances, functions and stubs can cross)"
    return f"cannot clone {article} {name} object{hint}"


class _Encoder:
    __slots__ = ("count", "export", "limits", "memo", "open_immutables")

    def __init__(self, export: Export | None, limits: RpcLimits) -> None:
        self.export = export
        self.limits = limits
        self.memo: dict[int, int] = {}
        self.open_immutables: set[int] = set()  # memo numbers of tuples/sets being walked
        self.count = 0

    def _container(self, value: object, size: int, depth: int) -> dict[int, int] | None:
        """Number a container in pre-order; return a back-reference if it was seen before."""
        key = id(value)
        seen = self.memo.get(key)
        if seen is not None:
            return {T_REF: seen}
        if depth >= self.limits.max_depth:
            raise _CloneFailure(f"nesting deeper than {self.limits.max_depth} levels")
        if size > self.limits.max_collection_len:
            raise _CloneFailure(
                f"{size} items is more than the limit of {self.limits.max_collection_len}"
            )
        self.count += size + 1
        if self.count > self.limits.max_objects:
            raise _CloneFailure(f"more than {self.limits.max_objects} objects in one value")
        self.memo[key] = len(self.memo)
        return None

    def walk(self, v: object, depth: int) -> object:
        t = type(v)
        if t is str or t is float or t is bool or v is None or t is bytes:
            return v
        if t is int:
            assert isinstance(v, int)
            return v if _INT_MIN <= v < _INT_END else self._bigint(v)
        if t is list or t is dict or t is tuple or t is set or t is frozenset or t is bytearray:
            return self._walk_container(v, t, depth)
        # Subclasses of the builtins travel as their base type, as json and pickle-free
        # serializers do (an IntEnum arrives as an int, an OrderedDict as a dict).
        if isinstance(v, str):  # str.__str__, not str(): a (str, Enum) member gives its value
            return str.__str__(v)
        if isinstance(v, int):
            return self.walk(int.__index__(v), depth)
        if isinstance(v, float):
            return float.__float__(v)
        if isinstance(v, bytes):
            return bytes(v)
        for base in (dict, list, tuple, set, frozenset, bytearray):
            if isinstance(v, base):
                return self._walk_container(v, base, depth)
        if t is _dt.datetime or t is _dt.time:
            return {T_DATETIME if t is _dt.datetime else T_TIME: _split_tz(v)}  # type: ignore[arg-type]
        if t is _dt.date:
            return {T_DATE: v.isoformat()}  # type: ignore[attr-defined]
        if t is _dt.timedelta:
            return {T_TIMEDELTA: [v.days, v.seconds, v.microseconds]}  # type: ignore[attr-defined]
        if t is decimal.Decimal:
            text = str(v)
            if len(text) > _decimal_max_len(self.limits):
                raise _CloneFailure(f"Decimal with more than {self.limits.max_int_digits} digits")
            return {T_DECIMAL: text}
        if t is uuid.UUID:
            return {T_UUID: v.bytes}  # type: ignore[attr-defined]
        if self.export is not None:
            cap = self.export(v)
            if cap is not None:
                return cap
        raise _CloneFailure(_describe(v, self.export is not None))

    def _bigint(self, v: int) -> dict[int, str]:
        limit = self.limits.max_int_digits
        # bit_length bounds the digit count cheaply, before str() does quadratic work.
        if v.bit_length() > limit * 10 // 3 + 4 or len(str(v).lstrip("-")) > limit:
            raise _CloneFailure(f"int with more than {limit} digits")
        return {T_BIGINT: str(v)}

    def _walk_container(self, v: Any, t: type, depth: int) -> object:
        if t is bytearray:
            ref = self._container(v, 0, depth)
            return ref if ref is not None else {T_BYTEARRAY: bytes(v)}
        ref = self._container(v, len(v), depth)
        if ref is not None:
            return ref
        walk = self.walk
        inner = depth + 1
        if t is dict:
            return self._walk_dict(v, inner)
        items: list[object] = []
        if t is list:
            for i, item in enumerate(v):
                try:
                    items.append(walk(item, inner))
                except _CloneFailure as failure:
                    failure.path.append(f"[{i}]")
                    raise
            return items
        number = len(self.memo) - 1
        self.open_immutables.add(number)
        for i, item in enumerate(v):
            try:
                out = walk(item, inner)
                if type(out) is dict and out.get(T_REF, -1) in self.open_immutables:
                    # The decoder builds a tuple after its items, so a cycle may come back to
                    # it only through a list or dict, which it can patch afterwards.
                    raise _CloneFailure("cannot clone a cycle back to a tuple from inside a tuple")
            except _CloneFailure as failure:
                failure.path.append(f"[{i}]" if t is tuple else f"{{{item!r}}}")
                raise
            items.append(out)
        self.open_immutables.discard(number)
        tag = T_TUPLE if t is tuple else T_SET if t is set else T_FROZENSET
        return {tag: items}

    def _walk_dict(self, v: dict[object, object], depth: int) -> object:
        walk = self.walk
        if all(type(k) is str for k in v):
            out: dict[str, object] = {}
            for k, item in v.items():
                try:
                    out[k] = walk(item, depth)  # type: ignore[index]
                except _CloneFailure as failure:
                    failure.path.append(f"[{k!r}]")
                    raise
            return out
        pairs: list[object] = []
        for k, item in v.items():
            try:
                pairs.append(walk(k, depth))
            except _CloneFailure as failure:
                failure.path.append(f" key {_key_repr(k)}")
                raise
            try:
                pairs.append(walk(item, depth))
            except _CloneFailure as failure:
                failure.path.append(f"[{_key_repr(k)}]")
                raise
        return {T_DICT: pairs}


def _key_repr(key: object) -> str:
    """``repr(key)`` for an error's path; an int too long for ``repr`` is named by its size."""
    try:
        return repr(key)
    except ValueError:  # an int past Python's digits limit for str()
        return f"<an int of {key.bit_length() if isinstance(key, int) else '?'} bits>"


def decode_value(raw: object, import_: Import, limits: RpcLimits) -> object:
    """Rebuild a value from a wire tree received from the peer.

    The tree's lists and str-keyed dicts are reused in place (msgspec made them for us alone).

    Raises:
        ProtocolError: the tree is not a valid value or exceeds a limit. Nothing is retried: a
            peer that sends an invalid value is broken or hostile.
    """
    t = type(raw)
    if t is str or t is int or t is float or t is bool or raw is None or t is bytes:
        return raw
    return _Decoder(import_, limits).run(raw)


class _Pending:
    """A back-reference to a tuple or set that is still being built."""

    __slots__ = ("fixups",)

    def __init__(self) -> None:
        self.fixups: list[tuple[list[object] | dict[object, object], object]] = []


# Frame kinds of the iterative decoder.
_LIST, _MAP, _PAIRS, _TUPLE, _SET, _FROZENSET = range(6)
_IMMUTABLE: Final = (_TUPLE, _SET, _FROZENSET)


class _Frame:
    __slots__ = ("depth", "items", "kind", "memo_index", "out", "pos")

    def __init__(
        self, kind: int, items: list[object], out: object, memo_index: int, depth: int
    ) -> None:
        self.kind = kind
        self.items = items  # the positions to walk: list items, map keys, or flat pairs
        self.out = out  # the list or dict being filled (the raw one, reused), or a new dict
        self.memo_index = memo_index
        self.depth = depth
        self.pos = 0


_NEW_FRAME: Final = object()
_ISO_MAX: Final = 64  # longer than any isoformat() of a datetime, date or time


class _Decoder:
    __slots__ = ("count", "import_", "limits", "memo", "stack")

    def __init__(self, import_: Import, limits: RpcLimits) -> None:
        self.import_ = import_
        self.limits = limits
        self.memo: list[object] = []
        self.stack: list[_Frame] = []
        self.count = 0

    def run(self, raw: object) -> object:
        stack = self.stack
        value = self._enter(raw, 1)
        while stack:
            frame = stack[-1]
            if value is not _NEW_FRAME:  # a child frame just finished
                self._deliver(frame, value)
            items = frame.items
            end = len(items)
            pos = frame.pos
            map_ = frame.kind == _MAP
            value = _NEW_FRAME
            while pos < end:
                child = frame.out[items[pos]] if map_ else items[pos]  # type: ignore[index]
                pos += 1
                t = type(child)
                if t is str or t is int or t is float or t is bool or child is None or t is bytes:
                    if frame.kind == _PAIRS:
                        frame.pos = pos
                        self._deliver(frame, child)
                    continue
                frame.pos = pos
                value = self._enter(child, frame.depth + 1)
                if value is _NEW_FRAME:
                    break
                self._deliver(frame, value)
                value = _NEW_FRAME
            else:
                frame.pos = pos
                stack.pop()
                value = self._finish(frame)
        if isinstance(value, _Pending):
            raise self._fail("a back-reference to an unfinished tuple")
        return value

    def _fail(self, what: str) -> ProtocolError:
        return ProtocolError(f"invalid value from peer: {what}")

    def _count(self, n: int) -> None:
        self.count += n
        if self.count > self.limits.max_objects:
            raise self._fail(f"more than {self.limits.max_objects} objects")

    def _push(self, kind: int, items: object, out: object, entries: int, depth: int) -> object:
        if entries > self.limits.max_collection_len:
            raise self._fail(f"a container of more than {self.limits.max_collection_len} items")
        if depth > self.limits.max_depth:
            raise self._fail(f"nesting deeper than {self.limits.max_depth} levels")
        self._count(entries + 1)
        memo_index = len(self.memo)
        self.memo.append(_Pending() if kind in _IMMUTABLE else out)
        self.stack.append(_Frame(kind, items, out, memo_index, depth))  # type: ignore[arg-type]
        return _NEW_FRAME

    def _enter(self, raw: object, depth: int) -> object:
        t = type(raw)
        if t is list:
            return self._push(_LIST, raw, raw, len(raw), depth)  # type: ignore[arg-type]
        if t is not dict:
            raise self._fail(f"unexpected {t.__name__}")
        assert isinstance(raw, dict)
        if len(raw) != 1 or type(next(iter(raw))) is not int:
            keys = list(raw)
            for k in keys:
                if type(k) is not str:
                    raise self._fail("a map whose keys are not all str")
            return self._push(_MAP, keys, raw, len(keys), depth)
        ((tag, payload),) = raw.items()
        if tag in (T_DICT, T_TUPLE, T_SET, T_FROZENSET):
            if type(payload) is not list:
                raise self._fail("malformed container")
            if tag == T_DICT:
                if len(payload) % 2:
                    raise self._fail("malformed dict")
                return self._push(_PAIRS, payload, {}, len(payload) // 2, depth)
            kind = _TUPLE if tag == T_TUPLE else _SET if tag == T_SET else _FROZENSET
            return self._push(kind, payload, payload, len(payload), depth)
        match tag:
            case 0:  # T_REF
                if type(payload) is not int or not 0 <= payload < len(self.memo):
                    raise self._fail("a back-reference to nothing")
                return self.memo[payload]
            case 5:  # T_BYTEARRAY
                if type(payload) is not bytes:
                    raise self._fail("malformed bytearray")
                self._count(1)
                out = bytearray(payload)
                self.memo.append(out)
                return out
            case 7:  # T_BIGINT
                if type(payload) is not str or not _is_decimal_int(payload):
                    raise self._fail("malformed int")
                if len(payload.lstrip("-")) > self.limits.max_int_digits:
                    raise self._fail(f"an int of more than {self.limits.max_int_digits} digits")
                return int(payload)
            case 8 | 10:  # T_DATETIME, T_TIME
                return self._parse(_join_tz(_dt.datetime if tag == 8 else _dt.time), payload)
            case 9:  # T_DATE
                if type(payload) is not str or len(payload) > _ISO_MAX:
                    raise self._fail("malformed date")
                return self._parse(_dt.date.fromisoformat, payload)
            case 11:  # T_TIMEDELTA
                if type(payload) is not list or len(payload) != 3:
                    raise self._fail("malformed timedelta")
                if not all(type(p) is int for p in payload):
                    raise self._fail("malformed timedelta")
                return self._parse(lambda p: _dt.timedelta(*p), payload)
            case 12:  # T_DECIMAL
                if type(payload) is not str or len(payload) > _decimal_max_len(self.limits):
                    raise self._fail("malformed Decimal")
                return self._parse(decimal.Decimal, payload)
            case 13:  # T_UUID
                if type(payload) is not bytes or len(payload) != 16:
                    raise self._fail("malformed UUID")
                return uuid.UUID(bytes=payload)
            case 20 | 21 | 22:  # T_EXPORT, T_IMPORT, T_ANSWER
                if type(payload) is not int:
                    raise self._fail("malformed capability")
                return self.import_(tag, payload)
            case _:
                raise self._fail(f"unknown tag {tag}")

    def _parse(self, parse: Callable[[Any], object], payload: object) -> object:
        try:
            return parse(payload)
        except (ValueError, TypeError, OverflowError, ArithmeticError) as exc:
            raise self._fail(f"malformed scalar ({exc})") from None

    def _deliver(self, frame: _Frame, value: object) -> None:
        """Store a finished child at the frame's last position."""
        kind = frame.kind
        slot = frame.pos - 1
        if kind == _LIST:
            if isinstance(value, _Pending):
                value.fixups.append((frame.items, slot))
            frame.items[slot] = value
        elif kind == _MAP:
            key = frame.items[slot]
            if isinstance(value, _Pending):
                value.fixups.append((frame.out, key))  # type: ignore[arg-type]
            frame.out[key] = value  # type: ignore[index]
        elif kind == _PAIRS:
            if isinstance(value, _Pending) and slot % 2 == 0:
                raise self._fail("a dict key refers to an unfinished tuple")
            frame.items[slot] = value
            if slot % 2:
                out = frame.out
                assert isinstance(out, dict)
                key = frame.items[slot - 1]
                if isinstance(value, _Pending):
                    value.fixups.append((out, key))
                try:
                    out[key] = value
                except TypeError:
                    raise self._fail("an unhashable dict key") from None
        else:
            # Tuple items and set members must be complete: the encoder refuses cycles that come
            # back to a tuple from inside another tuple, so a back-reference here is forged.
            if isinstance(value, _Pending):
                raise self._fail("a back-reference to an unfinished tuple or set")
            frame.items[slot] = value

    def _finish(self, frame: _Frame) -> object:
        kind = frame.kind
        if kind in (_LIST, _MAP, _PAIRS):
            return frame.out
        value: object
        try:
            if kind == _TUPLE:
                value = tuple(frame.items)
            elif kind == _SET:
                value = set(frame.items)
            else:
                value = frozenset(frame.items)
        except TypeError:
            raise self._fail("an unhashable set member") from None
        pending = self.memo[frame.memo_index]
        assert isinstance(pending, _Pending)
        self.memo[frame.memo_index] = value
        for container, slot in pending.fixups:
            container[slot] = value  # type: ignore[call-overload]
        return value


def _split_tz(v: _dt.datetime | _dt.time) -> list[object]:
    """``[naive isoformat, UTC offset in µs or None, fold]``: exact for any fixed offset (the
    isoformat of a sub-second offset does not round-trip)."""
    offset = v.utcoffset()
    offset_us = None if offset is None else offset // _dt.timedelta(microseconds=1)
    return [v.replace(tzinfo=None).isoformat(), offset_us, v.fold]


def _join_tz(cls: type[_dt.datetime] | type[_dt.time]) -> Callable[[Any], object]:
    def join(payload: Any) -> object:
        if type(payload) is not list or len(payload) != 3:
            raise ValueError("expected [isoformat, offset, fold]")
        text, offset_us, fold = payload
        if type(text) is not str or len(text) > _ISO_MAX or fold not in (0, 1):
            raise ValueError("bad isoformat or fold")
        value = cls.fromisoformat(text)
        if value.tzinfo is not None:
            raise ValueError("offset given twice")
        tz = None
        if offset_us is not None:
            if type(offset_us) is not int:
                raise ValueError("bad offset")
            tz = _dt.timezone(_dt.timedelta(microseconds=offset_us))
        return value.replace(tzinfo=tz, fold=fold)

    return join


def _is_decimal_int(text: str) -> bool:
    digits = text[1:] if text[:1] == "-" else text
    return digits.isascii() and digits.isdigit()


def _decimal_max_len(limits: RpcLimits) -> int:
    """Longest Decimal text either side accepts: the digit cap plus sign, point and exponent."""
    return limits.max_int_digits + 32
