"""KV namespaces, host side: values by type, ttl, ordered listing with prefix and cursor, namespace
isolation, grants, size limits, and durability across Loaders on the same data dir."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from tests.bindings._helpers import exact
from workerloader import Loader
from workerloader._errors import BindingError, PermissionDenied
from workerloader.bindings import KvNamespace
from workerloader.bindings._kv import MAX_KEY_BYTES, MAX_VALUE_BYTES

NO_WRITE = r"^this binding may not write this KV namespace$"
NO_READ = r"^this binding may not read this KV namespace$"


@pytest.fixture
def kv(loader: Loader) -> KvNamespace:
    return loader.kv("ns")


async def names(kv: KvNamespace, prefix: str = "") -> list[str]:
    listing = await kv.list(prefix=prefix)
    assert listing["list_complete"] is True
    return [key["name"] for key in listing["keys"]]


# ---------------------------------------------------------------------------------------------
# get / put / delete


async def test_a_string_reads_back_as_text_json_text_and_utf8_bytes(kv: KvNamespace) -> None:
    await kv.put("greeting", "héllo")
    assert await kv.get("greeting") == "héllo"
    assert await kv.get("greeting", type="text") == "héllo"
    assert await kv.get("greeting", type="bytes") == "héllo".encode()
    await kv.put("quoted", '"json text"')
    assert await kv.get("quoted", type="json") == "json text"


async def test_json_data_is_stored_as_json_text(kv: KvNamespace) -> None:
    value = {"a": [1, 2.5, None, True], "b": {"c": "d"}}
    await kv.put("doc", value)
    assert await kv.get("doc", type="json") == value
    assert await kv.get("doc") == '{"a": [1, 2.5, null, true], "b": {"c": "d"}}'
    await kv.put("number", 42)
    assert await kv.get("number", type="json") == 42


async def test_bytes_round_trip_unchanged(kv: KvNamespace) -> None:
    data = bytes(range(256))
    await kv.put("blob", data)
    assert await kv.get("blob", type="bytes") == data


async def test_a_missing_key_is_none_for_every_type(kv: KvNamespace) -> None:
    for kind in ("text", "json", "bytes"):
        assert await kv.get("missing", type=kind) is None


async def test_an_unknown_type_is_a_binding_error(kv: KvNamespace) -> None:
    with pytest.raises(
        BindingError, match=exact('type must be "text", "json" or "bytes", not \'xml\'')
    ):
        await kv.get("k", type="xml")


async def test_put_overwrites_and_delete_removes(kv: KvNamespace) -> None:
    await kv.put("k", "one")
    await kv.put("k", "two")
    assert await kv.get("k") == "two"
    await kv.delete("k")
    assert await kv.get("k") is None
    assert await names(kv) == []
    await kv.delete("k")  # deleting an absent key is not an error
    assert await kv.get("k") is None


async def test_a_value_that_is_not_json_data_is_a_binding_error(kv: KvNamespace) -> None:
    with pytest.raises(BindingError, match=r"^a KV value must be str, bytes or JSON data: "):
        await kv.put("k", {1, 2})
    assert await kv.get("k") is None


# ---------------------------------------------------------------------------------------------
# ttl


async def test_a_key_with_a_ttl_expires_for_get_and_list(kv: KvNamespace) -> None:
    before = time.time()
    await kv.put("short", "gone soon", ttl=0.2)
    await kv.put("long", "stays")
    assert await kv.get("short") == "gone soon"
    listing = await kv.list()
    expirations = {key["name"]: key["expiration"] for key in listing["keys"]}
    assert expirations["long"] is None
    assert before + 0.2 <= expirations["short"] <= time.time() + 0.2
    await asyncio.sleep(0.3)
    assert await kv.get("short") is None
    assert await kv.get("short", type="bytes") is None
    assert await names(kv) == ["long"]
    assert await names(kv, prefix="sh") == []


async def test_putting_again_without_ttl_makes_a_key_permanent(kv: KvNamespace) -> None:
    await kv.put("k", "v1", ttl=0.2)
    await kv.put("k", "v2")
    await asyncio.sleep(0.3)
    assert await kv.get("k") == "v2"


async def test_an_expired_key_can_be_written_again(kv: KvNamespace) -> None:
    await kv.put("k", "old", ttl=0.1)
    await asyncio.sleep(0.2)
    await kv.put("k", "new")
    assert await kv.get("k") == "new"
    assert await names(kv) == ["k"]


@pytest.mark.parametrize("ttl", [0, -1.0])
async def test_a_ttl_that_is_not_positive_is_a_binding_error(kv: KvNamespace, ttl: float) -> None:
    with pytest.raises(BindingError, match=r"^ttl must be positive$"):
        await kv.put("k", "v", ttl=ttl)
    assert await kv.get("k") is None


# ---------------------------------------------------------------------------------------------
# list


async def test_list_with_a_prefix_returns_exactly_the_keys_that_start_with_it(
    kv: KvNamespace,
) -> None:
    for key in ("user:2", "user:1", "users", "usex", "use", "admin", "user;", "user:"):
        await kv.put(key, "v")
    assert await names(kv, prefix="user:") == ["user:", "user:1", "user:2"]
    assert await names(kv, prefix="user") == ["user:", "user:1", "user:2", "user;", "users"]
    assert await names(kv, prefix="usex") == ["usex"]
    assert await names(kv, prefix="nope") == []
    assert await names(kv) == sorted(
        ["user:2", "user:1", "users", "usex", "use", "admin", "user;", "user:"]
    )


async def test_list_prefix_characters_are_not_wildcards(kv: KvNamespace) -> None:
    for key in ("a%b", "axb", "a_b", "ayb"):
        await kv.put(key, "v")
    assert await names(kv, prefix="a%") == ["a%b"]
    assert await names(kv, prefix="a_") == ["a_b"]


async def pages(kv: KvNamespace, prefix: str, limit: int) -> list[dict[str, Any]]:
    result, cursor = [], None
    while True:
        page = await kv.list(prefix=prefix, limit=limit, cursor=cursor)
        result.append(page)
        if page["list_complete"]:
            return result
        cursor = page["cursor"]
        assert isinstance(cursor, str)
        assert len(result) < 100


@pytest.mark.parametrize("prefix", ["", "k"])
async def test_cursor_paging_yields_disjoint_ordered_pages_covering_every_key(
    kv: KvNamespace, prefix: str
) -> None:
    keys = [f"k{i:02d}" for i in range(25)]
    for key in reversed(keys):
        await kv.put(key, key)
    if prefix:
        for other in ("j99", "l00", "K00"):
            await kv.put(other, "outside the prefix")
    result = await pages(kv, prefix, 10)
    page_names = [[key["name"] for key in page["keys"]] for page in result]
    assert [len(p) for p in page_names] == [10, 10, 5]
    assert [p["list_complete"] for p in result] == [False, False, True]
    assert result[-1]["cursor"] is None
    assert [name for page in page_names for name in page] == keys


async def test_a_page_that_exactly_fills_the_limit_is_complete_only_if_nothing_follows(
    kv: KvNamespace,
) -> None:
    for i in range(20):
        await kv.put(f"k{i:02d}", "v")
    result = await pages(kv, "", 10)
    assert [len(p["keys"]) for p in result] == [10, 10]
    assert [p["list_complete"] for p in result] == [False, True]


async def test_paging_skips_keys_that_expire_between_pages(kv: KvNamespace) -> None:
    for i in range(6):
        await kv.put(f"k{i}", "v", ttl=0.2 if i >= 3 else None)
    first = await kv.list(limit=2)
    await asyncio.sleep(0.3)
    second = await kv.list(limit=2, cursor=first["cursor"])
    assert [k["name"] for k in second["keys"]] == ["k2"]
    assert second["list_complete"] is True


@pytest.mark.parametrize("limit", [0, -1, 1001])
async def test_a_limit_outside_1_to_1000_is_a_binding_error(kv: KvNamespace, limit: int) -> None:
    with pytest.raises(BindingError, match=r"^limit must be between 1 and 1000$"):
        await kv.list(limit=limit)


@pytest.mark.parametrize("last", ["\U0010ffff", "\ud7ff"])
async def test_a_prefix_ending_in_any_valid_character_lists_its_keys(
    kv: KvNamespace, last: str
) -> None:
    # The upper bound of the prefix range is the prefix with its last character incremented;
    # that must not fail for U+10FFFF (no successor) nor U+D7FF (whose successor is a surrogate).
    prefix = "a" + last
    await kv.put(prefix + "x", "inside")
    await kv.put("b", "outside")
    assert await names(kv, prefix=prefix) == [prefix + "x"]


# ---------------------------------------------------------------------------------------------
# Namespaces


async def test_namespaces_never_see_each_others_keys_even_when_one_name_prefixes_the_other(
    loader: Loader,
) -> None:
    a, ab = loader.kv("a"), loader.kv("ab")
    # Were keys namespaced by prefixing, "a" + "bx" would be "ab" + "x".
    await a.put("bx", "a's bx")
    await a.put("b:x", "a's b:x")
    await ab.put("x", "ab's x")
    await ab.put(":x", "ab's :x")
    assert await names(a) == ["b:x", "bx"]
    assert await names(ab) == [":x", "x"]
    assert await names(a, prefix="b") == ["b:x", "bx"]
    assert await names(ab, prefix="b") == []
    assert await a.get("x") is None
    assert await ab.get("bx") is None
    assert await ab.get("b:x") is None
    assert await a.get(":x") is None
    await a.delete("x")
    await ab.delete("bx")
    assert await ab.get("x") == "ab's x"
    assert await a.get("bx") == "a's bx"


async def test_a_namespace_sees_the_same_data_through_every_handle(loader: Loader) -> None:
    await loader.kv("shared").put("k", "v")
    assert await loader.kv("shared").get("k") == "v"
    assert await loader.kv("Shared").get("k") is None


@pytest.mark.parametrize("name", ["", "a b", "a/b", "../x", "a..b", ".hidden", "a\n", "é"])
def test_an_invalid_namespace_name_is_refused(loader: Loader, name: str) -> None:
    with pytest.raises(ValueError, match=r"^invalid namespace or name "):
        loader.kv(name)


# ---------------------------------------------------------------------------------------------
# Grants


async def test_a_read_only_namespace_reads_but_cannot_put_or_delete(loader: Loader) -> None:
    await loader.kv("ns").put("k", "v")
    ro = loader.kv("ns", write=False)
    assert await ro.get("k") == "v"
    assert await names(ro) == ["k"]
    with pytest.raises(PermissionDenied, match=NO_WRITE):
        await ro.put("k", "changed")
    with pytest.raises(PermissionDenied, match=NO_WRITE):
        await ro.put("new", "v")
    with pytest.raises(PermissionDenied, match=NO_WRITE):
        await ro.delete("k")
    assert await names(ro) == ["k"]
    assert await ro.get("k") == "v"


async def test_a_write_only_namespace_writes_but_cannot_get_or_list(loader: Loader) -> None:
    wo = loader.kv("ns", read=False)
    await wo.put("k", "v")
    with pytest.raises(PermissionDenied, match=NO_READ):
        await wo.get("k")
    with pytest.raises(PermissionDenied, match=NO_READ):
        await wo.list()
    assert await loader.kv("ns").get("k") == "v"
    await wo.delete("k")
    assert await loader.kv("ns").get("k") is None


async def test_permission_denied_is_a_permission_error(loader: Loader) -> None:
    none = loader.kv("ns", read=False, write=False)
    with pytest.raises(PermissionError, match=NO_READ):
        await none.get("k")
    with pytest.raises(PermissionError, match=NO_WRITE):
        await none.put("k", "v")


# ---------------------------------------------------------------------------------------------
# Limits


async def test_keys_up_to_the_byte_limit_are_accepted_and_longer_ones_refused(
    kv: KvNamespace,
) -> None:
    longest = "k" * MAX_KEY_BYTES
    await kv.put(longest, "v")
    assert await kv.get(longest) == "v"
    too_long = exact(f"a KV key may be at most {MAX_KEY_BYTES} bytes")
    for key in ("k" * (MAX_KEY_BYTES + 1), "é" * (MAX_KEY_BYTES // 2 + 1)):  # bytes, not chars
        with pytest.raises(BindingError, match=too_long):
            await kv.put(key, "v")
        with pytest.raises(BindingError, match=too_long):
            await kv.get(key)
        with pytest.raises(BindingError, match=too_long):
            await kv.delete(key)
    assert await names(kv) == [longest]


async def test_an_empty_key_is_a_binding_error(kv: KvNamespace) -> None:
    with pytest.raises(BindingError, match=r"^a KV key must be a non-empty string$"):
        await kv.put("", "v")
    with pytest.raises(BindingError, match=r"^a KV key must be a non-empty string$"):
        await kv.get("")


async def test_values_up_to_the_byte_limit_are_accepted_and_larger_ones_refused(
    kv: KvNamespace,
) -> None:
    await kv.put("big", b"x" * MAX_VALUE_BYTES)
    assert await kv.get("big", type="bytes") == b"x" * MAX_VALUE_BYTES
    too_big = exact(f"a KV value may be at most {MAX_VALUE_BYTES} bytes")
    with pytest.raises(BindingError, match=too_big):
        await kv.put("big", b"y" * (MAX_VALUE_BYTES + 1))
    with pytest.raises(BindingError, match=too_big):
        await kv.put("big", "é" * (MAX_VALUE_BYTES // 2 + 1))
    with pytest.raises(BindingError, match=too_big):
        await kv.put("big", ["x" * MAX_VALUE_BYTES])
    assert await kv.get("big", type="bytes") == b"x" * MAX_VALUE_BYTES


# ---------------------------------------------------------------------------------------------
# Durability


async def test_data_written_by_one_loader_is_read_by_a_new_loader_on_the_same_dir(
    tmp_path: Path,
) -> None:
    first = Loader(tmp_path / "data").kv("ns")
    await first.put("text", "kept")
    await first.put("json", {"n": 1})
    await first.put("gone", "deleted")
    await first.delete("gone")
    await first.put("later", "expires", ttl=60)
    second = Loader(tmp_path / "data").kv("ns")
    assert await second.get("text") == "kept"
    assert await second.get("json", type="json") == {"n": 1}
    assert await second.get("gone") is None
    assert await names(second) == ["json", "later", "text"]
    assert (tmp_path / "data" / "kv.sqlite3").is_file()
