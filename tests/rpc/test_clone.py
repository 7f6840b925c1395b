"""The structured clone of docs/protocol.md §4: round trips, shared references, cycles, errors.

Every round trip goes through the real wire: ``encode_value`` → a ``Resolve`` frame →
``decode_message`` → ``decode_value``, so msgpack's view of the tree is part of what is tested.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import math
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workerloader import DataCloneError, ProtocolError
from workerloader.rpc import _wire
from workerloader.rpc._clone import decode_value, encode_value
from workerloader.rpc._limits import RpcLimits

LIMITS = RpcLimits()
MAX_DIGITS = LIMITS.max_int_digits
BIGGEST = 10**MAX_DIGITS - 1  # the largest int with max_int_digits digits


def no_export(value: object) -> dict[int, int] | None:
    return None


def no_import(tag: int, cap_id: int) -> object:
    raise AssertionError(f"unexpected capability tag {tag} id {cap_id}")


def to_wire(value: object, limits: RpcLimits = LIMITS) -> object:
    """Encode ``value`` and carry the tree through one real msgpack frame."""
    tree = encode_value(value, "value", no_export, limits)
    frame = _wire.encode_frame(_wire.Resolve(1, tree))
    message = _wire.decode_message(frame[4:])
    assert isinstance(message, _wire.Resolve)
    return message.value


def round_trip(value: object, limits: RpcLimits = LIMITS) -> object:
    return decode_value(to_wire(value, limits), no_import, limits)


def exact(message: str) -> str:
    """An anchored regex matching exactly ``message``."""
    return "^" + re.escape(message) + "$"


# ---------------------------------------------------------------------------------------------
# Strict structural comparison


_CONTAINERS = (list, dict, tuple, set, frozenset, bytearray)


def assert_same(want: object, got: object, seen: dict[int, object] | None = None) -> None:
    """``got`` is ``want`` rebuilt: same types, same values (nan == nan, -0.0 != 0.0, Decimal
    exponents kept), and the same sharing: two references to one container arrive as two
    references to one container, and distinct containers stay distinct."""
    if seen is None:
        seen = {}
    assert type(got) is type(want), f"{got!r} is a {type(got).__name__}, wanted {want!r}"
    if isinstance(want, _CONTAINERS) and not (isinstance(want, tuple | frozenset) and not want):
        if id(want) in seen:
            assert seen[id(want)] is got, f"sharing of {want!r} was not preserved"
            return
        assert all(other is not got for other in seen.values()), f"{got!r} is shared too often"
        seen[id(want)] = got
    if isinstance(want, float):
        assert isinstance(got, float)
        if math.isnan(want):
            assert math.isnan(got)
        else:
            assert got == want
            assert math.copysign(1.0, got) == math.copysign(1.0, want)
    elif isinstance(want, list | tuple):
        assert isinstance(got, list | tuple)
        assert len(got) == len(want)
        for w, g in zip(want, got, strict=True):
            assert_same(w, g, seen)
    elif isinstance(want, dict):
        assert isinstance(got, dict)
        assert len(got) == len(want)
        for (wk, wv), (gk, gv) in zip(want.items(), got.items(), strict=True):
            assert_same(wk, gk, seen)
            assert_same(wv, gv, seen)
    elif isinstance(want, set | frozenset):
        assert isinstance(got, set | frozenset)
        assert got == want
        members = {m: m for m in got}
        for w in want:
            assert_same(w, members[w], seen)
    elif isinstance(want, dt.datetime | dt.time):
        assert isinstance(got, dt.datetime | dt.time)
        assert got == want
        assert got.isoformat() == want.isoformat()
        assert (got.tzinfo is None) == (want.tzinfo is None)
    elif isinstance(want, decimal.Decimal):
        assert str(got) == str(want)
    else:
        assert got == want


# ---------------------------------------------------------------------------------------------
# Strategies

OFFSET_BOUND = dt.timedelta(hours=23, minutes=59, seconds=59, microseconds=999_999)
fixed_offsets = st.builds(
    dt.timezone, st.timedeltas(min_value=-OFFSET_BOUND, max_value=OFFSET_BOUND)
)
timezones = st.none() | st.just(dt.UTC) | fixed_offsets

ints = st.one_of(
    st.integers(min_value=-(2**64), max_value=2**64),
    st.integers(min_value=-BIGGEST, max_value=BIGGEST),
    st.sampled_from(
        [-(2**63), -(2**63) - 1, 2**63, 2**64 - 1, 2**64, BIGGEST, -BIGGEST, 10**40, -(10**40)]
    ),
)


def hashable_scalars(allow_nan: bool) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.booleans(),
        ints,
        st.floats(allow_nan=allow_nan),
        st.text(max_size=12),
        st.binary(max_size=12),
        st.datetimes(timezones=timezones),
        st.dates(),
        st.times(timezones=timezones),
        st.timedeltas(),
        # sNaN cannot be hashed and NaN never equals itself, so NaNs stay out of keys.
        st.decimals(allow_nan=allow_nan, allow_infinity=True),
        st.uuids(),
    )


hashables = st.recursive(
    hashable_scalars(allow_nan=False),
    lambda inner: st.lists(inner, max_size=3).map(tuple) | st.frozensets(inner, max_size=3),
    max_leaves=6,
)

scalars = hashable_scalars(allow_nan=True) | st.binary(max_size=12).map(bytearray)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=6), inner, max_size=4),
        st.dictionaries(hashables, inner, max_size=4),
        st.sets(hashables, max_size=4),
        st.frozensets(hashables, max_size=4),
    )


values = st.recursive(scalars, _containers, max_leaves=24)


# ---------------------------------------------------------------------------------------------
# Round-trip properties


@settings(max_examples=300, deadline=None)
@given(values)
def test_every_clonable_value_round_trips(value: object) -> None:
    assert_same(value, round_trip(value))


@settings(max_examples=200, deadline=None)
@given(ints)
def test_ints_round_trip_up_to_the_digit_cap(value: int) -> None:
    tree = to_wire(value)
    if -(2**63) <= value < 2**64:
        assert tree == value  # a plain msgpack int
    else:
        assert tree == {7: str(value)}
    assert_same(value, decode_value(tree, no_import, LIMITS))


@settings(max_examples=200, deadline=None)
@given(st.floats())
def test_floats_round_trip_including_nan_and_inf(value: float) -> None:
    got = round_trip(value)
    assert isinstance(got, float)
    if math.isnan(value):
        assert math.isnan(got)
    else:
        assert got == value
        assert math.copysign(1.0, got) == math.copysign(1.0, value)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(hashables, values, max_size=5))
def test_dicts_with_non_str_keys_round_trip(value: dict[Any, Any]) -> None:
    assert_same(value, round_trip(value))


@settings(max_examples=200, deadline=None)
@given(st.datetimes(timezones=timezones), st.times(timezones=timezones))
def test_datetimes_and_times_keep_their_offset(when: dt.datetime, at: dt.time) -> None:
    out = round_trip([when, at])
    assert isinstance(out, list)
    got_when, got_at = out
    assert isinstance(got_when, dt.datetime)
    assert isinstance(got_at, dt.time)
    assert_same(when, got_when)
    assert_same(at, got_at)
    assert got_when.utcoffset() == when.utcoffset()
    assert got_at.utcoffset() == at.utcoffset()


@settings(max_examples=200, deadline=None)
@given(values, st.sampled_from([0, 1, 2, 3]))
def test_values_within_tight_limits_are_sendable_or_refused_locally(
    value: object, level: int
) -> None:
    """§7: the same limits apply to what a side sends. A value the encoder accepts must be a value
    the decoder (with the same limits) accepts; otherwise the sender must raise DataCloneError."""
    limits = [
        RpcLimits(max_depth=3, max_collection_len=4, max_objects=24, max_int_digits=25),
        RpcLimits(max_depth=2, max_collection_len=3, max_objects=10, max_int_digits=20),
        RpcLimits(max_depth=5, max_collection_len=8, max_objects=40, max_int_digits=30),
        RpcLimits(max_depth=1, max_collection_len=2, max_objects=4, max_int_digits=20),
    ][level]
    refused: DataCloneError | None = None
    try:
        wire = to_wire(value, limits)
    except DataCloneError as exc:
        refused = exc
    if refused is not None:
        assert str(refused).startswith("value")
        return
    assert_same(value, decode_value(wire, no_import, limits))


# ---------------------------------------------------------------------------------------------
# Exact wire forms


@pytest.mark.parametrize(
    ("value", "tree"),
    [
        (None, None),
        (True, True),
        (1.5, 1.5),
        ("s", "s"),
        (b"b", b"b"),
        (-(2**63), -(2**63)),
        (2**64 - 1, 2**64 - 1),
        (2**64, {7: str(2**64)}),
        (-(2**63) - 1, {7: str(-(2**63) - 1)}),
        ([1, "a"], [1, "a"]),
        ({"a": 1}, {"a": 1}),
        ({1: "a"}, {1: [1, "a"]}),
        ((1, 2), {2: [1, 2]}),
        ({1}, {3: [1]}),
        (frozenset({1}), {4: [1]}),
        (bytearray(b"xy"), {5: b"xy"}),
        (dt.datetime(2024, 5, 6, 7, 8, 9), {8: ["2024-05-06T07:08:09", None, 0]}),
        (
            dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.timezone(dt.timedelta(hours=2))),
            {8: ["2024-05-06T07:08:09", 7_200_000_000, 0]},
        ),
        (dt.date(2024, 5, 6), {9: "2024-05-06"}),
        (dt.time(7, 8, 9, 10), {10: ["07:08:09.000010", None, 0]}),
        (dt.timedelta(days=-1, seconds=5, microseconds=6), {11: [-1, 5, 6]}),
        (decimal.Decimal("1.50"), {12: "1.50"}),
        (uuid.UUID(int=1), {13: uuid.UUID(int=1).bytes}),
    ],
)
def test_wire_forms_match_the_protocol_table(value: object, tree: object) -> None:
    assert encode_value(value, "value", no_export, LIMITS) == tree
    assert_same(value, round_trip(value))


def test_a_timezone_arrives_as_a_fixed_offset() -> None:
    tz = dt.timezone(dt.timedelta(hours=5, minutes=30), "IST")
    got = round_trip(dt.datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=tz))
    assert isinstance(got, dt.datetime)
    assert got.tzinfo == dt.timezone(dt.timedelta(hours=5, minutes=30))
    assert got.isoformat() == "2024-01-02T03:04:05.000006+05:30"


def test_builtin_subclasses_travel_as_their_base_type() -> None:
    class Level(enum.IntEnum):
        HIGH = 3

    class Color(str, enum.Enum):  # noqa: UP042 - the classic str mix-in, not StrEnum
        RED = "red"

    got = round_trip([Level.HIGH, Color.RED])
    assert_same([3, "red"], got)


# ---------------------------------------------------------------------------------------------
# Big ints and the digit cap


def test_an_int_with_max_int_digits_digits_round_trips() -> None:
    assert_same(BIGGEST, round_trip(BIGGEST))
    assert_same(-BIGGEST, round_trip(-BIGGEST))


@pytest.mark.parametrize("value", [BIGGEST + 1, -(BIGGEST + 1), 7**5000])
def test_an_int_over_the_digit_cap_is_refused(value: int) -> None:
    with pytest.raises(
        DataCloneError, match=exact(f"value: int with more than {MAX_DIGITS} digits")
    ):
        encode_value(value, "value", no_export, LIMITS)


def test_the_decoder_refuses_an_int_over_the_digit_cap() -> None:
    with pytest.raises(ProtocolError, match=r"^invalid value from peer: an int of more than 1000"):
        decode_value({7: "9" * (MAX_DIGITS + 2)}, no_import, LIMITS)


def test_the_digit_cap_cannot_exceed_cpythons_int_str_limit() -> None:
    """Above CPython's 4300-digit int/str conversion limit, str() and int() would fail with a
    bare ValueError mid-call, so the limit refuses such a setting up front."""
    with pytest.raises(ValueError, match=r"^RpcLimits.max_int_digits must be at most 4300$"):
        RpcLimits(max_int_digits=5000)
    value = 10**4299 + 7
    assert_same(value, round_trip(value, RpcLimits(max_int_digits=4300)))


# ---------------------------------------------------------------------------------------------
# Shared references and cycles


def test_a_shared_list_arrives_shared() -> None:
    inner = [1, 2]
    out = round_trip([inner, inner])
    assert isinstance(out, list)
    assert out[0] is out[1]
    assert out[0] == [1, 2]


@pytest.mark.parametrize(
    "make",
    [
        lambda: {"k": 1},
        lambda: (1, "x"),
        lambda: {1, 2},
        lambda: frozenset({1, 2}),
        lambda: bytearray(b"ab"),
        lambda: [],
    ],
    ids=["dict", "tuple", "set", "frozenset", "bytearray", "empty-list"],
)
def test_every_container_kind_stays_shared(make: Any) -> None:
    shared = make()
    out = round_trip([shared, {"again": shared}, (shared,)])
    assert isinstance(out, list)
    assert out[0] is out[1]["again"]
    assert out[0] is out[2][0]
    assert_same([shared, {"again": shared}, (shared,)], out)


def test_equal_but_distinct_lists_stay_distinct() -> None:
    out = round_trip([[1], [1]])
    assert isinstance(out, list)
    assert out[0] == out[1]
    assert out[0] is not out[1]


def test_a_shared_tuple_used_as_key_and_value_arrives_shared() -> None:
    key = (1, 2)
    out = round_trip({key: key})
    assert isinstance(out, dict)
    ((got_key, got_value),) = out.items()
    assert got_key is got_value
    assert got_key == (1, 2)


def test_a_list_containing_itself_arrives_containing_itself() -> None:
    value: list[object] = [1]
    value.append(value)
    out = round_trip(value)
    assert isinstance(out, list)
    assert out[0] == 1
    assert out[1] is out
    assert len(out) == 2


def test_a_dict_containing_itself_arrives_containing_itself() -> None:
    value: dict[str, object] = {"n": 1}
    value["self"] = value
    out = round_trip(value)
    assert isinstance(out, dict)
    assert out["self"] is out
    assert out["n"] == 1


def test_a_non_str_key_dict_containing_itself_arrives_containing_itself() -> None:
    value: dict[object, object] = {1: "one"}
    value[2] = value
    out = round_trip(value)
    assert isinstance(out, dict)
    assert out[2] is out
    assert out[1] == "one"


def test_a_tuple_in_a_cycle_through_a_list() -> None:
    t: tuple[list[object]] = ([],)
    t[0].append(t)
    out = round_trip(t)
    assert type(out) is tuple
    assert len(out) == 1
    assert type(out[0]) is list
    assert len(out[0]) == 1
    assert out[0][0] is out


def test_a_list_in_a_cycle_through_a_tuple() -> None:
    value: list[object] = []
    value.append((value, 1))
    out = round_trip(value)
    assert isinstance(out, list)
    assert type(out[0]) is tuple
    assert out[0][0] is out
    assert out[0][1] == 1


def test_a_tuple_in_a_cycle_through_a_dict() -> None:
    t: tuple[dict[str, object], int] = ({}, 5)
    t[0]["back"] = t
    out = round_trip(t)
    assert type(out) is tuple
    assert out[1] == 5
    assert out[0]["back"] is out


def test_a_cycle_back_to_a_tuple_from_inside_another_tuple_is_refused() -> None:
    """§4: the decoder builds a tuple after its items, so it can patch a back-reference only in a
    list or dict. Here the reference back to t sits inside another tuple (u): refused up front
    with a clear error rather than decoded wrongly."""
    t: tuple[list[object]] = ([],)
    u = (t,)
    t[0].append(u)
    with pytest.raises(
        DataCloneError,
        match=r"^value\[0\]\[0\]\[0\]: cannot clone a cycle back to a tuple from inside a tuple$",
    ):
        encode_value(t, "value", no_export, LIMITS)


def test_cycles_and_sharing_survive_together() -> None:
    shared = {"x": [1.5, None]}
    root: list[object] = [shared]
    node: dict[str, object] = {"root": root, "shared": shared}
    root.append(node)
    root.append((node, shared))
    out = round_trip(root)
    assert isinstance(out, list)
    assert out[1]["root"] is out
    assert out[1]["shared"] is out[0]
    assert out[2][0] is out[1]
    assert out[2][1] is out[0]
    assert_same(root, out)


# ---------------------------------------------------------------------------------------------
# DataCloneError names the path and the type


class Widget:
    pass


class Engine:
    pass


class Opaque:
    """Hashable, not clonable, with a stable repr for path messages."""

    def __repr__(self) -> str:
        return "<Opaque>"


HINT = " (only data, RpcTarget instances, functions and stubs can cross)"


def _gen() -> Iterator[int]:
    """A generator function: calling it makes a generator object."""
    yield from ()


@pytest.mark.parametrize(
    ("value", "root", "message"),
    [
        ({"CONF": {"hook": _gen()}}, "env", "env['CONF']['hook']: cannot clone a generator object"),
        ([1, 2, _gen()], "value", "value[2]: cannot clone a generator object"),
        ([0, [1, Widget()]], "value", f"value[1][1]: cannot clone a Widget object{HINT}"),
        ({"e": Engine()}, "result", f"result['e']: cannot clone an Engine object{HINT}"),
        (Widget(), "arguments", f"arguments: cannot clone a Widget object{HINT}"),
        ((1, _gen()), "value", "value[1]: cannot clone a generator object"),
        ({1: _gen()}, "value", "value[1]: cannot clone a generator object"),
        ({Opaque(): 1}, "value", f"value key <Opaque>: cannot clone an Opaque object{HINT}"),
        ({Opaque()}, "value", f"value{{<Opaque>}}: cannot clone an Opaque object{HINT}"),
        (
            [{"a": [None, (0, {"b": object()})]}],
            "v",
            "v[0]['a'][1][1]['b']: cannot clone an object object",
        ),
        (Widget, "value", "value: cannot clone a type object"),
    ],
)
def test_data_clone_error_names_path_and_type(value: object, root: str, message: str) -> None:
    with pytest.raises(DataCloneError, match=exact(message)):
        encode_value(value, root, no_export, LIMITS)


def test_data_clone_error_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=exact("x: cannot clone a generator object")):
        encode_value(_gen(), "x", no_export, LIMITS)


def test_nesting_at_the_depth_limit_crosses_and_beyond_is_refused() -> None:
    depth = LIMITS.max_depth
    ok: list[object] = []
    for _ in range(depth - 1):
        ok = [ok]
    assert_same(ok, round_trip(ok))
    too_deep: list[object] = [ok]
    message = "value" + "[0]" * depth + f": nesting deeper than {depth} levels"
    with pytest.raises(DataCloneError, match=exact(message)):
        encode_value(too_deep, "value", no_export, LIMITS)


def test_a_collection_over_the_length_limit_is_refused() -> None:
    n = LIMITS.max_collection_len
    with pytest.raises(
        DataCloneError, match=exact(f"value[1]: {n + 1} items is more than the limit of {n}")
    ):
        encode_value([0, [0] * (n + 1)], "value", no_export, LIMITS)


# ---------------------------------------------------------------------------------------------
# What the encoder accepts, the decoder with the same limits must accept (§7)


def assert_sendable_or_refused(value: object, limits: RpcLimits = LIMITS) -> None:
    try:
        wire = to_wire(value, limits)
    except DataCloneError:
        return
    assert_same(value, decode_value(wire, no_import, limits))


def test_a_dict_with_more_than_half_the_collection_limit_of_entries() -> None:
    value = {f"k{i}": i for i in range(60_000)}
    assert_sendable_or_refused(value)


def test_a_non_str_key_dict_with_more_than_half_the_collection_limit_of_entries() -> None:
    value = {i: None for i in range(60_000)}
    assert_sendable_or_refused(value)


def test_many_back_references_in_one_value() -> None:
    shared: list[object] = []
    assert_sendable_or_refused([shared] * LIMITS.max_collection_len)


def test_a_decimal_longer_than_the_decoder_accepts() -> None:
    assert_sendable_or_refused(decimal.Decimal("1" * (4 * MAX_DIGITS + 1)))


# ---------------------------------------------------------------------------------------------
# Capability hooks


def test_non_data_goes_to_the_export_hook_and_tags_to_the_import_hook() -> None:
    def callback() -> None:
        pass

    asked: list[object] = []

    def export(value: object) -> dict[int, int] | None:
        asked.append(value)
        return {20: -7} if value is callback else None

    tree = encode_value({"cb": callback, "n": [1]}, "arguments", export, LIMITS)
    assert tree == {"cb": {20: -7}, "n": [1]}
    assert asked == [callback]

    imported: list[tuple[int, int]] = []
    marker = object()

    def import_(tag: int, cap_id: int) -> object:
        imported.append((tag, cap_id))
        return marker

    out = decode_value({"cb": {20: -7}, "own": {21: -2}}, import_, LIMITS)
    assert out == {"cb": marker, "own": marker}
    assert imported == [(20, -7), (21, -2)]


def test_export_hook_returning_none_means_not_clonable() -> None:
    with pytest.raises(DataCloneError, match=exact("value['f']: cannot clone a function object")):
        encode_value({"f": _gen}, "value", lambda v: None, LIMITS)


def test_without_an_export_hook_only_data_crosses_and_the_error_says_so() -> None:
    with pytest.raises(
        DataCloneError,
        match=exact(
            "value['f']: cannot clone a function object"
            " (only data can cross here: no functions, stubs or RpcTarget instances)"
        ),
    ):
        encode_value({"f": _gen}, "value", None, LIMITS)
