"""Importing a worker's modules from its module map, with the user's file names and lines."""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import json
import re
import sys
import types
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from importlib.abc import Loader

__all__ = ["ModuleMap", "module_name"]


def module_name(path: str) -> str | None:
    """``"pkg/util.py"`` → ``"pkg.util"``, ``"pkg/__init__.py"`` → ``"pkg"``; None if not .py."""
    if not path.endswith(".py"):
        return None
    name = path[:-3].replace("/", ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def _check_path(path: object) -> None:
    """ValueError unless ``path`` is a relative path of plain names: no leading "/", no
    empty, "." or ".." segment, no NUL or backslash (what a file name in a worker's module
    map may hold, as in a wrangler project)."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"module name {path!r}: expected a non-empty str")
    if "\0" in path or "\\" in path or any(p in ("", ".", "..") for p in path.split("/")):
        raise ValueError(
            f"module name {path!r}: expected a relative path of plain names "
            "(like 'main.py' or 'lib/util.py'; no '/' at the start, no '.' or '..')"
        )


_FORMS = (
    'an entry is Python source (a str, in a .py entry), {"json": ...}, {"text": str} or '
    '{"data": bytes}'
)


class ModuleMap:
    """A finder and loader for the ``.py`` entries of a module map; data entries are parsed into
    ``workers.modules``. (Not derived from ``importlib.abc``: importing that module pulls in
    importlib.resources, tempfile, shutil and three compression libraries, all of which would
    then sit in the zygote that every worker is forked from.)"""

    def __init__(self, modules: Mapping[str, object]) -> None:
        self.sources: dict[str, tuple[str, str, bool]] = {}  # name -> (path, source, is_pkg)
        self.bodies: set[str] = set()  # modules given as a function body (see exec_module)
        self.data: dict[str, object] = {}
        for path, value in modules.items():
            _check_path(path)
            name = module_name(path)
            if name is not None and isinstance(value, str):
                self.sources[name] = (path, value, path.endswith("__init__.py"))
            elif (
                name is not None
                and isinstance(value, Mapping)
                and set(value) == {"body"}
                and isinstance(value["body"], str)
            ):
                self.sources[name] = (path, value["body"], False)
                self.bodies.add(name)
            elif isinstance(value, Mapping) and len(value) == 1:
                ((kind, content),) = value.items()
                if kind == "json" or (kind == "text" and isinstance(content, str)):
                    self.data[path] = content
                elif kind == "data" and isinstance(content, (bytes, bytearray)):
                    self.data[path] = bytes(content)
                elif kind == "json" and isinstance(content, str):
                    self.data[path] = json.loads(content)
                elif kind in ("text", "data"):
                    wanted = "str" if kind == "text" else "bytes (over HTTP: data_base64, a str)"
                    raise ValueError(
                        f"module {path!r}: {{{kind!r}: ...}} takes {wanted}, "
                        f"not {type(content).__name__}"
                    )
                else:
                    raise ValueError(f"module {path!r}: {kind!r} is not a module type; {_FORMS}")
            elif isinstance(value, str):  # source, but not in a .py entry
                raise ValueError(
                    f"module {path!r}: Python source goes in an entry whose name ends in .py "
                    f"({path.rsplit('.', 1)[0]}.py); {_FORMS}"
                )
            else:
                raise ValueError(
                    f"module {path!r}: {type(value).__name__} is not a module; {_FORMS}"
                )
        # Implicit packages for "pkg/mod.py" without "pkg/__init__.py".
        for name in list(self.sources):
            parts = name.split(".")
            for i in range(1, len(parts)):
                package = ".".join(parts[:i])
                self.sources.setdefault(package, (package.replace(".", "/") + "/", "", True))

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        entry = self.sources.get(fullname)
        if entry is None:
            return None
        spec = importlib.machinery.ModuleSpec(
            fullname, cast("Loader", self), origin=entry[0], is_package=entry[2]
        )
        if entry[2]:
            spec.submodule_search_locations = []
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        """Default module creation."""
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        path, source, _ = self.sources[module.__name__]
        module.__file__ = path
        if module.__name__ in self.bodies:
            code = _compile_body(source, path)
        else:
            code = compile(source, path, "exec", dont_inherit=True)
        exec(code, module.__dict__)

    def install(self) -> None:
        sys.meta_path.insert(0, self)

    def import_main(self, name: str) -> types.ModuleType:
        """Import the main module ``name`` (an entry of this map), as ``import`` would.

        A top-level module is made and run here directly: the import machinery's generic path
        (module locks, finder loop, spec attributes) costs a fresh worker ~0.1 ms on its first
        call. Dotted names go through ``importlib`` for their parent packages.
        """
        if "." in name or name in sys.modules:
            return importlib.import_module(name)
        spec = self.find_spec(name, None)
        if spec is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        module = types.ModuleType(name)
        module.__spec__ = spec
        module.__loader__ = spec.loader
        if spec.submodule_search_locations is not None:  # a package (pkg/__init__.py)
            module.__path__ = spec.submodule_search_locations
            module.__package__ = name
        else:
            module.__package__ = ""
        sys.modules[name] = module
        try:
            self.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return sys.modules[name]  # as import does: the module may have replaced itself

    def user_files(self) -> set[str]:
        """The user's module paths (not those named ``_workerloader_*``, a prefix the runtime
        keeps for its own modules, such as its warm-up's)."""
        return {p for p, _, _ in self.sources.values() if not p.startswith("_workerloader_")}


BODY_PARAMETERS = ("env", "sdk", "db", "kv", "sql", "blobs", "ai", "api", "context")
"""The names a function-body module's code sees (``POST /execute``)."""


_HEADER = f"async def main({', '.join(BODY_PARAMETERS)}):\n"

_NEEDS_TREE = re.compile(r'"""|\'\'\'|\\\n|[\r\f]|=\s*[}!:]')
"""What indenting a body could change: the text of a multi-line string (triple quotes, a
backslash continuation), where a line starts (carriage returns; a form feed resets the
indentation column), and the expression text an f-string's ``=`` specifier shows (which may
span lines since 3.12). Over-matching only costs the slower route."""


def _compile_body(source: str, path: str) -> types.CodeType:
    """Compile ``source`` as the body of ``async def main(*BODY_PARAMETERS)``, keeping the
    user's line numbers; ``await`` and ``return`` work at its top level.

    Most bodies are compiled as text: a header line, every line of the body indented by a tab,
    and line numbers shifted back by the header. A leading tab moves every line by the same
    columns under both of the tokenizer's tab rules, so indentation compares (and fails with
    ``TabError``) as in the body alone. A fresh worker compiles that in about half the time of
    the syntax-tree route (measured in workers: 164-191 against 287-383 µs for ``return 4``),
    which takes the rest: bodies ``_NEEDS_TREE`` matches, and any body the text route cannot
    compile cleanly (a syntax error or a compile-time warning; the tree route then reports it,
    with the user's own line).
    """
    if not _NEEDS_TREE.search(source):
        text = _HEADER + "\t" + source.replace("\n", "\n\t")
        try:
            return _shift_lines(_compile_strictly(text, path), -1)
        except (SyntaxError, Warning):
            pass
    return _compile_body_tree(source, path)


def _compile_strictly(text: str, path: str) -> types.CodeType:
    """``compile`` with compile-time warnings raised as errors (a warning met then is raised
    as a SyntaxError)."""
    mutated = getattr(warnings, "_filters_mutated", None)
    if mutated is None:  # not in this Python: the documented way
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return compile(text, path, "exec", dont_inherit=True)
    # Swapping the filter list itself, as catch_warnings does inside, costs a fresh worker a
    # third as much. Only this thread runs while compile holds the GIL (save finalizers a
    # collection may run), and a fresh list leaves nothing behind if one adds a filter.
    filters = warnings.filters
    warnings.filters = [("error", None, Warning, None, 0)]
    mutated()
    try:
        return compile(text, path, "exec", dont_inherit=True)
    finally:
        warnings.filters = filters
        mutated()


def _shift_lines(code: types.CodeType, by: int) -> types.CodeType:
    """``code`` with every line number, its nested code objects' too, moved by ``by``."""
    consts = tuple(
        _shift_lines(const, by) if isinstance(const, types.CodeType) else const
        for const in code.co_consts
    )
    return code.replace(co_firstlineno=code.co_firstlineno + by, co_consts=consts)


def _compile_body_tree(source: str, path: str) -> types.CodeType:
    """``_compile_body`` by the syntax tree: the user's body under a function node, so every
    line keeps its number and every string its content."""
    tree = ast.parse(source, path)
    args = ast.arguments(
        posonlyargs=[],
        args=[ast.arg(arg=name) for name in BODY_PARAMETERS],
        kwonlyargs=[],
        kw_defaults=[],
        defaults=[],
    )
    main = ast.AsyncFunctionDef(
        name="main",
        args=args,
        body=tree.body or [ast.Pass()],
        decorator_list=[],
        returns=None,
        lineno=1,
        col_offset=0,
    )
    if sys.version_info >= (3, 12):
        main.type_params = []
    module = ast.Module(body=[main], type_ignores=[])
    ast.fix_missing_locations(module)
    return compile(module, path, "exec", dont_inherit=True)
