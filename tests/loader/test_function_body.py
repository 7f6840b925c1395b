"""A main module given as a function body (``{"body": code}``), as ``POST /execute`` runs a
snippet: the body of ``async def main(*BODY_PARAMETERS)`` with the user's lines.

Most bodies are compiled as indented text, the rest through the syntax tree; both routes must
give the same values and the same line numbers.
"""

from __future__ import annotations

import asyncio
import sys
import traceback
import types
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from workerloader import Loader, WorkerCode, WorkerLoadError
from workerloader.runtime import _modules
from workerloader.runtime._modules import BODY_PARAMETERS, _compile_body, _compile_body_tree


@pytest.fixture
async def loader(tmp_path: Path) -> AsyncIterator[Loader]:
    async with Loader(tmp_path / "data", pool_size=2) as loader:
        yield loader


async def run_body(loader: Loader, body: str) -> object:
    code = WorkerCode(main_module="execute.py", modules={"execute.py": {"body": body}})
    stub = loader.get(None, lambda: code)
    try:
        return await stub.get_entrypoint().execute()
    finally:
        await stub.aclose()


def run_here(compiled: types.CodeType) -> object:
    namespace: dict[str, object] = {}
    exec(compiled, namespace)
    main = namespace["main"]
    assert callable(main)
    return asyncio.run(main(*[None] * len(BODY_PARAMETERS)))


BODIES = {
    "plain": ("x = 1\nreturn x + 1\n", 2),
    "escapes in a string": ("s = 'a\\nb'\nreturn s\n", "a\nb"),
    "a multi-line string": ('s = """a\n  b"""\nreturn s\n', "a\n  b"),
    "a continued line": ("x = 1 + \\\n    2\nreturn x\n", 3),
    "a continued string": ("s = 'a\\\nb'\nreturn s\n", "ab"),
    "comments only": ("# nothing to do\n", None),
    "nothing": ("", None),
    "CRLF line ends": ("x = 1\r\nreturn x\r\n", 1),
    "nested code": (
        "def f(a):\n    return [i * a for i in range(3)]\nclass C:\n    v = 2\nreturn f(C.v)\n",
        [0, 2, 4],
    ),
    "await": ("import asyncio\nawait asyncio.sleep(0)\nreturn 'slept'\n", "slept"),
    "tabs": ("if True:\n\tx = 5\nreturn x\n", 5),
    "a form feed": ("x = 1\n\fy = x + 1\nreturn y\n", 2),
}
if sys.version_info >= (3, 12):  # an f-string's fields may span lines
    BODIES["an f-string's = over lines"] = ("x = 'a'\nreturn f'{x=\n}'\n", "x=\n'a'")


@pytest.mark.parametrize("body", BODIES.values(), ids=BODIES.keys())
def test_both_routes_give_the_same_value(body: tuple[str, object]) -> None:
    source, expected = body
    assert run_here(_compile_body(source, "execute.py")) == expected
    assert run_here(_compile_body_tree(source, "execute.py")) == expected


REJECTED = {
    "tabs and spaces that do not compare": (
        "if 1:\n\tif 1:\n        y = 2\nreturn y\n",
        TabError,
        3,
    ),
    "an unclosed bracket": ("x = 1\ny = (\n", SyntaxError, 2),
    "a stray indent": ("x = 1\n    y = 2\n", IndentationError, 2),
}


@pytest.mark.parametrize("case", REJECTED.values(), ids=REJECTED.keys())
def test_both_routes_reject_the_same_bodies_at_the_users_line(
    case: tuple[str, type[SyntaxError], int],
) -> None:
    source, error, line = case
    for compile_body in (_compile_body, _compile_body_tree):
        with pytest.raises(error) as info:
            compile_body(source, "execute.py")
        assert type(info.value) is error
        assert (info.value.filename, info.value.lineno) == ("execute.py", line)


RAISING = {  # the lines of the last two frames: main's, and the function it called if any
    "text route": ("a = 1\nb = 2\nraise ValueError('x')\n", [3]),
    "tree route": ('s = """\nmulti-line\n"""\nraise ValueError(s)\n', [4]),
    "in a nested function": ("def f():\n    return 1 / 0\n\nreturn f()\n", [4, 2]),
}


@pytest.mark.parametrize("case", RAISING.values(), ids=RAISING.keys())
def test_both_routes_keep_the_users_line_numbers(case: tuple[str, list[int]]) -> None:
    source, lines = case
    for compiled in (_compile_body(source, "execute.py"), _compile_body_tree(source, "execute.py")):
        with pytest.raises((ValueError, ZeroDivisionError)) as info:
            run_here(compiled)
        frames = traceback.extract_tb(info.value.__traceback__)
        assert [f.lineno for f in frames if f.filename == "execute.py"] == lines


def test_only_bodies_that_need_it_go_through_the_syntax_tree(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    routed: list[str] = []

    def tree(source: str, path: str) -> types.CodeType:
        routed.append(source)
        return _compile_body_tree(source, path)

    monkeypatch.setattr(_modules, "_compile_body_tree", tree)
    for source, _ in BODIES.values():
        _compile_body(source, "execute.py")
    assert routed == [
        BODIES[name][0]
        for name in (
            "a multi-line string",
            "a continued line",
            "a continued string",
            "comments only",
            "nothing",
            "CRLF line ends",
            "a form feed",
            "an f-string's = over lines",
        )
        if name in BODIES
    ]


def test_a_syntax_error_and_a_compile_warning_name_the_users_line() -> None:
    with pytest.raises(SyntaxError) as info:
        _compile_body("x = 1\ny = (\n", "execute.py")
    assert (info.value.filename, info.value.lineno) == ("execute.py", 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _compile_body("x = 1\nif x is 1:\n    pass\nreturn x\n", "execute.py")
    assert [(w.category, w.lineno) for w in caught] == [(SyntaxWarning, 2)]


async def test_a_worker_runs_bodies_of_both_routes_with_the_users_lines(loader: Loader) -> None:
    assert await run_body(loader, 's = """a\n  b"""\nreturn [s, 1 + \\\n 2]') == ["a\n  b", 3]
    assert await run_body(loader, "  return 4") == 4  # a uniformly indented paste runs
    for body, line in (("x = 1\n\nraise KeyError('k')", 3), ('"""doc"""\nx = 1\n1 / 0', 3)):
        with pytest.raises((KeyError, ZeroDivisionError)) as info:
            await run_body(loader, body)
        assert f'File "execute.py", line {line}, in main' in info.value.__notes__[0]
    with pytest.raises(WorkerLoadError) as load_error:
        await run_body(loader, "x = 1\nreturn (\n")
    assert (load_error.value.file, load_error.value.line) == ("execute.py", 2)


def test_without_the_private_filter_hook_warnings_still_name_the_users_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A warnings module as in a Python that has no _filters_mutated (catch_warnings is used).
    without_hook = types.SimpleNamespace(
        catch_warnings=warnings.catch_warnings, simplefilter=warnings.simplefilter
    )
    monkeypatch.setattr(_modules, "warnings", without_hook)
    assert run_here(_compile_body("return 4", "execute.py")) == 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _compile_body("x = 1\nif x is 1:\n    pass\nreturn x\n", "execute.py")
    assert [(w.category, w.lineno) for w in caught] == [(SyntaxWarning, 2)]
