"""Document collections (``sdk.db``), host side: create/get/update/delete, list with equality
filters, ordering and cursors, namespace isolation, full-text search, names, limits, grants."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import pytest

from tests.bindings._helpers import exact
from workerloader import Loader
from workerloader._errors import BindingError, PermissionDenied
from workerloader.bindings import Documents
from workerloader.bindings._docs import MAX_DOCUMENT_BYTES

NO_WRITE = r"^this binding may not write these documents$"
NO_READ = r"^this binding may not read these documents$"


@pytest.fixture
def db(loader: Loader) -> Documents:
    return loader.db("t1")


def ids(docs: list[dict[str, Any]]) -> list[str]:
    return [doc["id"] for doc in docs]


async def people(db: Documents) -> None:
    for doc in (
        {
            "id": "ada",
            "name": "Ada",
            "role": "admin",
            "age": 36,
            "active": True,
            "flag": True,
            "tags": '["x"]',
        },
        {
            "id": "alan",
            "name": "Alan",
            "role": "user",
            "age": 41,
            "active": False,
            "flag": 1,
            "tags": ["x"],
        },
        {"id": "grace", "name": "Grace", "role": "admin", "age": 85, "active": True},
        {"id": "linus", "name": "Linus", "role": "user", "age": 36, "active": True},
        {
            "id": "barbara",
            "name": "Barbara",
            "role": "user",
            "age": "36",
            "active": True,
            "flag": False,
        },
    ):
        await db.create("people", doc)


# ---------------------------------------------------------------------------------------------
# create / get / update / delete


async def test_a_document_is_a_plain_dict_of_its_fields_plus_its_id(db: Documents) -> None:
    created = await db.create("users", {"name": "ada"})
    assert set(created) == {"name", "id"}
    assert created["name"] == "ada"
    assert isinstance(created["id"], str)
    assert created["id"]
    assert [u["name"] for u in await db.list("users")] == ["ada"]
    assert await db.get("users", created["id"]) == created
    assert await db.list("users") == [created]


async def test_create_keeps_a_given_id_and_makes_unique_ones_otherwise(db: Documents) -> None:
    given = await db.create("users", {"id": "u1", "name": "ada", "tags": ["a", {"b": None}]})
    assert given == {"id": "u1", "name": "ada", "tags": ["a", {"b": None}]}
    assert await db.get("users", "u1") == given
    made = {(await db.create("users", {"n": i}))["id"] for i in range(20)}
    assert len(made) == 20
    assert "u1" not in made


async def test_creating_an_existing_id_is_a_binding_error_and_changes_nothing(
    db: Documents,
) -> None:
    await db.create("users", {"id": "u1", "name": "ada"})
    with pytest.raises(BindingError, match=exact("users/u1 already exists")):
        await db.create("users", {"id": "u1", "name": "impostor"})
    assert await db.get("users", "u1") == {"id": "u1", "name": "ada"}
    assert ids(await db.search("users", "impostor")) == []


async def test_get_of_a_missing_document_is_none(db: Documents) -> None:
    assert await db.get("users", "nope") is None


async def test_update_merges_fields_and_returns_the_document(db: Documents) -> None:
    await db.create("users", {"id": "u1", "name": "ada", "age": 36})
    updated = await db.update("users", "u1", {"age": 37, "city": "London", "id": "other"})
    assert updated == {"id": "u1", "name": "ada", "age": 37, "city": "London"}
    assert await db.get("users", "u1") == updated
    assert await db.get("users", "other") is None


async def test_update_of_a_missing_document_is_a_key_error_and_creates_nothing(
    db: Documents,
) -> None:
    with pytest.raises(KeyError, match=exact("'users/nope'")):
        await db.update("users", "nope", {"name": "ghost"})
    assert await db.list("users") == []
    assert await db.search("users", "ghost") == []


async def test_delete_removes_the_document_and_says_whether_it_existed(db: Documents) -> None:
    await db.create("users", {"id": "u1", "name": "ada"})
    await db.create("users", {"id": "u2", "name": "ada"})
    assert await db.delete("users", "u1") is True
    assert await db.delete("users", "u1") is False
    assert await db.get("users", "u1") is None
    assert ids(await db.list("users")) == ["u2"]
    assert ids(await db.search("users", "ada")) == ["u2"]
    await db.create("users", {"id": "u1", "name": "back"})  # the id is free again
    assert (await db.get("users", "u1")) == {"id": "u1", "name": "back"}


async def test_collections_of_a_namespace_are_separate(db: Documents) -> None:
    await db.create("users", {"id": "x", "kind": "user"})
    await db.create("admins", {"id": "x", "kind": "admin"})
    assert await db.get("users", "x") == {"id": "x", "kind": "user"}
    assert await db.get("admins", "x") == {"id": "x", "kind": "admin"}
    assert await db.delete("admins", "x") is True
    assert await db.get("users", "x") == {"id": "x", "kind": "user"}


# ---------------------------------------------------------------------------------------------
# list


async def test_list_without_order_is_by_id(db: Documents) -> None:
    await people(db)
    assert ids(await db.list("people")) == ["ada", "alan", "barbara", "grace", "linus"]


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ({"role": "admin"}, ["ada", "grace"]),
        ({"age": 36}, ["ada", "linus"]),
        ({"age": "36"}, ["barbara"]),
        ({"active": True}, ["ada", "barbara", "grace", "linus"]),
        ({"active": False}, ["alan"]),
        ({"role": "user", "active": True}, ["barbara", "linus"]),
        ({"role": "admin", "age": 41}, []),
        ({"role": "nobody"}, []),
        ({"name": "ada"}, []),  # equality is exact, case included
        ({"flag": True}, ["ada"]),  # a boolean matches JSON true only, not 1
        ({"flag": 1}, ["alan"]),  # and a number never a boolean
        ({"flag": 0}, []),
        ({"flag": False}, ["barbara"]),
        ({"flag": 1.0}, ["alan"]),  # 1 and 1.0 are the same JSON number
        ({"tags": '["x"]'}, ["ada"]),  # a string matches a string, never an array's JSON
        ({"tags": "x"}, []),
        ({}, ["ada", "alan", "barbara", "grace", "linus"]),
    ],
)
async def test_where_filters_by_field_equality(
    db: Documents, where: dict[str, Any], expected: list[str]
) -> None:
    await people(db)
    assert ids(await db.list("people", where=where)) == expected


async def test_where_values_are_data_not_sql(db: Documents) -> None:
    await people(db)
    assert await db.list("people", where={"role": "admin' OR '1'='1"}) == []
    with pytest.raises(
        BindingError, match=exact("where values must be str, int, float, bool or None")
    ):
        await db.list("people", where={"role": ["admin"]})
    for number in (math.nan, math.inf):
        with pytest.raises(
            BindingError, match=exact("where numbers must be finite (JSON has no NaN or infinity)")
        ):
            await db.list("people", where={"age": number})


async def test_order_by_a_field_ascending_and_descending(db: Documents) -> None:
    for doc in (
        {"id": "a", "score": 3},
        {"id": "b", "score": 1},
        {"id": "c", "score": 2},
        {"id": "d", "score": 2},
    ):
        await db.create("scores", doc)
    assert ids(await db.list("scores", order_by="score")) == ["b", "c", "d", "a"]
    assert ids(await db.list("scores", order_by="-score")) == ["a", "c", "d", "b"]
    assert ids(await db.list("scores", order_by="-score", limit=2)) == ["a", "c"]
    assert ids(await db.list("scores", where={"score": 2}, order_by="-score")) == ["c", "d"]


async def test_cursor_paging_by_id_covers_every_document_once(db: Documents) -> None:
    for i in reversed(range(25)):
        await db.create("items", {"id": f"d{i:02d}", "n": i})
    seen: list[list[str]] = []
    cursor: str | None = None
    while True:
        page = ids(await db.list("items", limit=10, cursor=cursor))
        if not page:
            break
        seen.append(page)
        cursor = page[-1]
    assert [len(p) for p in seen] == [10, 10, 5]
    assert [i for p in seen for i in p] == [f"d{i:02d}" for i in range(25)]


async def test_cursor_paging_with_order_by_counts_documents_seen(db: Documents) -> None:
    for i in range(25):
        await db.create("items", {"id": f"d{i:02d}", "n": i % 7})
    everything = ids(await db.list("items", order_by="-n", limit=1000))
    pages = [
        ids(await db.list("items", order_by="-n", limit=10, cursor=cursor))
        for cursor in (None, "10", "20", "30")
    ]
    assert [len(p) for p in pages] == [10, 10, 5, 0]
    assert [i for p in pages for i in p] == everything
    assert len(set(everything)) == 25


@pytest.mark.parametrize("limit", [0, 1001])
async def test_a_limit_outside_1_to_1000_is_a_binding_error(db: Documents, limit: int) -> None:
    with pytest.raises(BindingError, match=r"^limit must be between 1 and 1000$"):
        await db.list("users", limit=limit)


async def test_a_document_with_nan_does_not_break_listing_its_collection(db: Documents) -> None:
    # Python's json writes NaN, which is not JSON: either refuse the document, or store it so
    # that the collection can still be filtered.
    await db.create("items", {"id": "good", "name": "good"})
    for bad in (math.nan, math.inf):
        with contextlib.suppress(BindingError):
            await db.create("items", {"name": "bad", "score": bad})
    assert ids(await db.list("items", where={"name": "good"})) == ["good"]
    assert ids(await db.list("items", order_by="name"))[-1] == "good"


# ---------------------------------------------------------------------------------------------
# Namespaces


async def test_namespaces_are_isolated_for_the_same_collection_and_id(loader: Loader) -> None:
    t1, t2 = loader.db("t1"), loader.db("t2")
    await t1.create("users", {"id": "u1", "name": "ada", "bio": "engines"})
    assert await t2.get("users", "u1") is None
    assert await t2.list("users") == []
    assert await t2.search("users", "engines") == []
    await t2.create("users", {"id": "u1", "name": "grace", "bio": "compilers"})
    assert (await t1.get("users", "u1"))["name"] == "ada"  # type: ignore[index]
    assert (await t2.get("users", "u1"))["name"] == "grace"  # type: ignore[index]
    await t2.update("users", "u1", {"name": "hopper"})
    assert (await t1.get("users", "u1"))["name"] == "ada"  # type: ignore[index]
    assert ids(await t1.search("users", "engines")) == ["u1"]
    assert await t1.search("users", "compilers") == []
    assert await t2.delete("users", "u1") is True
    assert await t1.get("users", "u1") == {"id": "u1", "name": "ada", "bio": "engines"}
    assert ids(await t1.search("users", "ada")) == ["u1"]
    with pytest.raises(KeyError, match=exact("'users/u1'")):
        await t2.update("users", "u1", {"name": "again"})


async def test_namespaces_whose_names_prefix_each_other_are_isolated(loader: Loader) -> None:
    a, ab = loader.db("a"), loader.db("ab")
    await a.create("bx", {"id": "y", "in": "a"})
    await ab.create("x", {"id": "y", "in": "ab"})
    assert await ab.list("bx") == []
    assert await a.list("x") == []
    assert await a.list("bx") == [{"id": "y", "in": "a"}]


# ---------------------------------------------------------------------------------------------
# Search


async def test_search_finds_documents_by_words_in_nested_string_fields(db: Documents) -> None:
    await db.create(
        "users",
        {
            "id": "ada",
            "name": "Ada Lovelace",
            "profile": {"bio": "Mathematician and writer", "tags": ["poetry", {"x": "engines"}]},
            "born": 1815,
        },
    )
    await db.create("users", {"id": "grace", "name": "Grace Hopper", "profile": {"bio": "navy"}})
    assert ids(await db.search("users", "engines")) == ["ada"]
    assert ids(await db.search("users", "poetry")) == ["ada"]
    assert ids(await db.search("users", "MATHEMATICIAN")) == ["ada"]
    assert ids(await db.search("users", "navy")) == ["grace"]
    assert ids(await db.search("users", "lovelace writer")) == ["ada"]  # every word
    assert ids(await db.search("users", "lovelace navy")) == []
    assert await db.search("users", "1815") == []  # only string values are text
    assert await db.search("users", "ada grace") == []
    assert await db.search("other", "ada") == []


async def test_search_follows_updates(db: Documents) -> None:
    await db.create("users", {"id": "u1", "bio": "old words"})
    await db.update("users", "u1", {"bio": "new words"})
    assert await db.search("users", "old") == []
    assert ids(await db.search("users", "new")) == ["u1"]
    assert ids(await db.search("users", "words")) == ["u1"]  # indexed once, not twice


async def test_search_limit_caps_the_results(db: Documents) -> None:
    for i in range(30):
        await db.create("items", {"id": f"i{i:02d}", "text": "common"})
    assert len(await db.search("items", "common", limit=5)) == 5
    assert len(await db.search("items", "common")) == 20


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('ada OR "', ["or"]),  # OR is a word to find, not an operator
        ("ada OR grace", []),
        ('"ada', ["ada", "or"]),
        ('ada"', ["ada", "or"]),
        ("ada*", ["ada", "or"]),  # not a prefix query: "adam" does not match
        ("^ada", ["ada", "or"]),
        ("-ada", ["ada", "or"]),
        ("NOT ada", ["or"]),  # NOT too: "or" has "not" and "ada"
        ("NEAR(ada grace)", []),
        ("name:ada", []),
        ("(ada", ["ada", "or"]),
        ("{name}: ada", []),
        ("ada AND", []),
        ("'", []),
        ("", []),
        ('"*^():{}', []),
    ],
)
async def test_search_text_is_words_never_fts_query_syntax(
    db: Documents, text: str, expected: list[str]
) -> None:
    await db.create("users", {"id": "ada", "name": "ada lovelace"})
    await db.create("users", {"id": "grace", "name": "grace hopper"})
    await db.create("users", {"id": "adam", "name": "adam smith"})
    await db.create("users", {"id": "or", "name": "ada", "note": "to be or not"})
    assert sorted(ids(await db.search("users", text))) == expected


# ---------------------------------------------------------------------------------------------
# Names and limits


@pytest.mark.parametrize(
    "name", ["", "1users", "a b", "a/b", "a.b", "a:b", "x" * 65, "users\n", "users\x00", 5]
)
async def test_an_invalid_collection_name_is_a_binding_error(db: Documents, name: Any) -> None:
    invalid = exact(f"invalid collection name {name!r} (letters, digits, _ and -)")
    with pytest.raises(BindingError, match=invalid):
        await db.create(name, {"a": 1})
    with pytest.raises(BindingError, match=invalid):
        await db.list(name)
    with pytest.raises(BindingError, match=invalid):
        await db.get(name, "x")
    with pytest.raises(BindingError, match=invalid):
        await db.delete(name, "x")
    with pytest.raises(BindingError, match=invalid):
        await db.search(name, "x")


async def test_valid_collection_names_include_dashes_and_underscores(db: Documents) -> None:
    for name in ("_private", "user-profiles", "a" * 64, "A1"):
        await db.create(name, {"id": "x"})
        assert ids(await db.list(name)) == ["x"]


@pytest.mark.parametrize("field", ["", "a.b", "a b", "$", "a[0]", "a-b", "1a", "name\n"])
async def test_an_invalid_field_name_is_a_binding_error(db: Documents, field: str) -> None:
    await db.create("users", {"id": "u1", "name": "ada"})
    invalid = exact(f"invalid field name {field!r}")
    with pytest.raises(BindingError, match=invalid):
        await db.list("users", where={field: "ada"})
    with pytest.raises(BindingError, match=invalid):
        await db.list("users", order_by=field)
    with pytest.raises(BindingError, match=invalid):
        await db.list("users", order_by="-" + field)


@pytest.mark.parametrize("data", [["a"], "text", None, 5])
async def test_a_document_must_be_a_dict(db: Documents, data: Any) -> None:
    with pytest.raises(BindingError, match=r"^a document is a dict of its fields$"):
        await db.create("users", data)


async def test_a_document_must_be_json_data(db: Documents) -> None:
    with pytest.raises(BindingError, match=r"^a document must be JSON data: "):
        await db.create("users", {"id": "u1", "tags": {1, 2}})
    assert await db.get("users", "u1") is None


async def test_a_document_larger_than_the_limit_is_refused(db: Documents) -> None:
    too_big = exact(f"a document may be at most {MAX_DOCUMENT_BYTES} bytes of JSON")
    with pytest.raises(BindingError, match=too_big):
        await db.create("users", {"id": "u1", "blob": "x" * MAX_DOCUMENT_BYTES})
    assert await db.get("users", "u1") is None
    await db.create("users", {"id": "u1", "blob": "x" * 1000})
    with pytest.raises(BindingError, match=too_big):
        await db.update("users", "u1", {"blob": "x" * MAX_DOCUMENT_BYTES})
    assert await db.get("users", "u1") == {"id": "u1", "blob": "x" * 1000}


# ---------------------------------------------------------------------------------------------
# Grants


async def test_a_read_only_grant_reads_but_cannot_write(loader: Loader) -> None:
    await loader.db("t1").create("users", {"id": "u1", "name": "ada"})
    ro = loader.db("t1", write=False)
    assert await ro.get("users", "u1") == {"id": "u1", "name": "ada"}
    assert ids(await ro.list("users")) == ["u1"]
    assert ids(await ro.search("users", "ada")) == ["u1"]
    with pytest.raises(PermissionDenied, match=NO_WRITE):
        await ro.create("users", {"name": "grace"})
    with pytest.raises(PermissionDenied, match=NO_WRITE):
        await ro.update("users", "u1", {"name": "changed"})
    with pytest.raises(PermissionDenied, match=NO_WRITE):
        await ro.delete("users", "u1")
    assert await ro.list("users") == [{"id": "u1", "name": "ada"}]


async def test_a_write_only_grant_writes_but_cannot_read(loader: Loader) -> None:
    wo = loader.db("t1", read=False)
    created = await wo.create("users", {"id": "u1", "name": "ada"})
    assert created == {"id": "u1", "name": "ada"}
    for read in (
        lambda: wo.get("users", "u1"),
        lambda: wo.list("users"),
        lambda: wo.search("users", "ada"),
    ):
        with pytest.raises(PermissionDenied, match=NO_READ):
            await read()
    assert await loader.db("t1").get("users", "u1") == created


async def test_documents_survive_a_new_loader_on_the_same_dir(tmp_path: Path) -> None:
    first = Loader(tmp_path / "data").db("t1")
    await first.create("users", {"id": "u1", "name": "ada", "bio": "engines"})
    await first.create("users", {"id": "u2", "name": "grace"})
    await first.delete("users", "u2")
    second = Loader(tmp_path / "data").db("t1")
    assert await second.list("users") == [{"id": "u1", "name": "ada", "bio": "engines"}]
    assert ids(await second.search("users", "engines")) == ["u1"]
