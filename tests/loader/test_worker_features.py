"""The worker API as a user meets it, in the real sandbox: env and capabilities, props, modules,
module state, logs, errors, outbound fetch, and the Loader's cache (same id, LRU, idle TTL)."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import os
import re
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from workerloader import (
    DataCloneError,
    Limits,
    Loader,
    OutputLimitExceeded,
    RpcTarget,
    WorkerCode,
    WorkerError,
    WorkerLoadError,
    WorkerStub,
)

MAIN = """
import asyncio, logging, time, warnings
import workers
from workers import WorkerEntrypoint, Response

calls = 0


class QuotaError(Exception):
    pass


class Api(WorkerEntrypoint):
    async def count(self):
        global calls
        calls += 1
        return calls

    async def data(self):
        return self.env.DATA

    async def item(self, key):
        return [self.env[key], key in self.env]

    async def use_capabilities(self):
        await self.env.NOTIFY("x")
        return await self.env.SVC.method(2)

    async def props(self):
        return self.ctx.props

    async def modules(self):
        return [workers.modules["config.json"], workers.modules["banner.txt"],
                workers.modules["logo.bin"]]

    async def talk(self):
        print("printed")
        logging.getLogger().warning("logged")
        warnings.warn("careful")
        return "done"

    async def print_then_fail(self):
        print("before")
        raise ValueError("bad")

    async def print_then_fail_custom(self):
        print("before custom")
        raise QuotaError("over quota")

    async def flood(self):
        for _ in range(100):
            try:
                print("x" * 99)
            except Exception:
                pass
        return "survived"

    async def fetch_out(self):
        return await workers.fetch("https://example.com")

    async def suspend(self):
        await asyncio.sleep(0.01)
        return "resumed"

    async def block(self, seconds):
        time.sleep(seconds)
        return "blocked"

    async def burn_and_lie(self, seconds, claim=0):
        import workerloader.runtime._main as runtime
        runtime._process_time_ns = lambda: claim  # what the worker tells the host of its CPU
        return await self.burn(seconds)

    async def unclonable(self):
        return {"ok": [1, (x for x in "ab")]}

    async def burn(self, seconds):
        end = time.process_time() + seconds
        while time.process_time() < end:
            pass
        return "burnt"

    async def flood_swallowing_everything(self):
        for _ in range(100):
            try:
                print("x" * 99)
            except BaseException:
                pass
        return "survived"

    async def warn_again(self):
        warnings.warn("again")
        return "warned"

    async def exit(self, how):
        print("leaving")
        if how == "sys.exit":
            import sys
            sys.exit(3)
        if how == "own":
            class Stop(BaseException):
                pass
            raise Stop("mine")
        raise KeyboardInterrupt

    async def leave_running(self, how):
        async def spin():
            await asyncio.sleep(0.05)
            end = time.process_time() + 60
            while time.process_time() < end:
                pass
        if how == "wait_until":
            self.ctx.wait_until(spin())
        else:
            asyncio.get_running_loop().create_task(spin())
        return "answered"

    async def leave_briefly(self):
        async def work():
            await asyncio.sleep(0.05)
            end = time.process_time() + 0.02
            while time.process_time() < end:
                pass
        self.ctx.wait_until(work())
        return "answered"
"""


def exact(message: str) -> str:
    return "^" + re.escape(message) + "$"


BAD = r"^bad(\n|$)"  # pytest matches the message followed by the exception's notes


def api_code(env: Mapping[str, object] | None = None, **limits: int) -> WorkerCode:
    return WorkerCode(
        main_module="main.py",
        modules={"main.py": MAIN},
        env=env or {},
        limits=Limits(**limits) if limits else Limits(),
    )


class Counted:
    """A factory that counts how often the Loader runs it."""

    def __init__(self, make: Callable[[], WorkerCode] = api_code) -> None:
        self.make = make
        self.calls = 0

    def __call__(self) -> WorkerCode:
        self.calls += 1
        return self.make()


@pytest.fixture
async def loader(tmp_path: Path) -> AsyncIterator[Loader]:
    async with Loader(tmp_path / "data", pool_size=2) as loader:
        yield loader


def api(stub: WorkerStub, props: dict[str, object] | None = None) -> Any:
    return stub.get_entrypoint("Api", props=props)


# ---------------------------------------------------------------------------------------------
# A call that suspends


async def test_a_call_that_suspends_returns_its_value(loader: Loader) -> None:
    assert await api(loader.get("w", api_code)).suspend() == "resumed"


# ---------------------------------------------------------------------------------------------
# env: data and capabilities


async def test_clonable_env_data_arrives_equal(loader: Loader) -> None:
    data = {
        "when": dt.datetime(2024, 1, 2, 3, 4, 5, 678, tzinfo=dt.UTC),
        "naive": dt.datetime(2024, 1, 2, 3, 4, 5),
        "day": dt.date(2024, 2, 29),
        "items": [1, "two", 3.5, None, True, b"\x00\xff", (4, 5)],
        "nested": {"a": {"b": [{"c": [1, [2, [3]]]}]}, "n": -(2**70)},
    }
    stub = loader.get("w", lambda: api_code({"DATA": data}))
    assert await api(stub).data() == data


class Service(RpcTarget):
    def __init__(self) -> None:
        self.seen: list[int] = []

    async def method(self, value: int) -> int:
        self.seen.append(value)
        return value * 10


async def test_capabilities_in_env_cross_as_stubs_and_the_host_sees_the_calls(
    loader: Loader,
) -> None:
    notified: list[str] = []

    def notify(message: str) -> None:
        notified.append(message)

    service = Service()
    stub = loader.get("w", lambda: api_code({"NOTIFY": notify, "SVC": service}))
    assert await api(stub).use_capabilities() == 20
    assert notified == ["x"]
    assert service.seen == [2]


async def test_env_supports_item_access(loader: Loader) -> None:
    stub = loader.get("w", lambda: api_code({"KEY": "value"}))
    assert await api(stub).item("KEY") == ["value", True]
    with pytest.raises(KeyError) as info:
        await api(stub).item("MISSING")
    assert info.value.args == ("MISSING",)


# ---------------------------------------------------------------------------------------------
# props


async def test_each_entrypoint_stub_sees_its_own_props(loader: Loader) -> None:
    stub = loader.get("w", api_code)
    t1, t2 = api(stub, {"tenant": "t1"}), api(stub, {"tenant": "t2", "plan": ["pro"]})
    assert await t1.props() == {"tenant": "t1"}
    assert await t2.props() == {"tenant": "t2", "plan": ["pro"]}
    assert await t1.props() == {"tenant": "t1"}
    assert await api(stub).props() == {}


# ---------------------------------------------------------------------------------------------
# modules


async def test_data_modules_are_readable_from_workers_modules(loader: Loader) -> None:
    def code() -> WorkerCode:
        return WorkerCode(
            main_module="main.py",
            modules={
                "main.py": MAIN,
                "config.json": {"json": {"lang": "en"}},
                "banner.txt": {"text": "hello"},
                "logo.bin": {"data": b"\x89PNG"},
            },
        )

    assert await api(loader.get("w", code)).modules() == [{"lang": "en"}, "hello", b"\x89PNG"]


PACKAGED = {
    "main.py": (
        "import helpers\n"
        "from pkg import g\n"
        "from workers import WorkerEntrypoint\n"
        "\n"
        "class Default(WorkerEntrypoint):\n"
        "    async def run(self):\n"
        "        return [g(), helpers.h()]\n"
    ),
    "pkg/__init__.py": "from .util import f\n\ndef g():\n    return f() + 1\n",
    "pkg/util.py": "def f():\n    return 41\n",
    "helpers.py": "def h():\n    return 'helped'\n",
}


async def test_packages_relative_and_absolute_imports_work(loader: Loader) -> None:
    stub = loader.get("w", lambda: WorkerCode(main_module="main.py", modules=PACKAGED))
    assert await stub.get_entrypoint().run() == [42, "helped"]


async def test_the_main_module_is_imported_as_import_would(loader: Loader) -> None:
    modules = {
        "main.py": (
            "import sys\n"
            "import helpers\n"
            "from workers import WorkerEntrypoint\n"
            "\n"
            "class Default(WorkerEntrypoint):\n"
            "    async def who(self):\n"
            "        same = sys.modules[__name__] is helpers.main_module()\n"
            "        return [__name__, __package__, __file__, __spec__.name, same]\n"
        ),
        "helpers.py": "def main_module():\n    import main\n    return main\n",
    }
    stub = loader.get("w", lambda: WorkerCode(main_module="main.py", modules=modules))
    assert await stub.get_entrypoint().who() == ["main", "", "main.py", "main", True]


async def test_a_main_module_inside_a_package_imports_relatively(loader: Loader) -> None:
    modules = {
        "app/main.py": (
            "from .util import f\n"
            "from workers import WorkerEntrypoint\n"
            "\n"
            "class Default(WorkerEntrypoint):\n"
            "    async def run(self):\n"
            "        return [f(), __name__, __package__]\n"
        ),
        "app/util.py": "def f():\n    return 41\n",
    }
    stub = loader.get("w", lambda: WorkerCode(main_module="app/main.py", modules=modules))
    assert await stub.get_entrypoint().run() == [41, "app.main", "app"]


async def test_worker_code_finds_its_event_loop_at_import_and_in_calls(loader: Loader) -> None:
    source = (
        "import asyncio\n"
        "from workers import WorkerEntrypoint\n"
        "AT_IMPORT = asyncio.get_event_loop()\n"
        "\n"
        "class Default(WorkerEntrypoint):\n"
        "    async def same(self):\n"
        "        running = asyncio.get_running_loop()\n"
        "        return running is asyncio.get_event_loop() is AT_IMPORT\n"
    )
    stub = loader.get("w", lambda: WorkerCode(main_module="main.py", modules={"main.py": source}))
    assert await stub.get_entrypoint().same() is True


async def test_an_unknown_module_type_is_a_load_error(loader: Loader) -> None:
    code = WorkerCode(
        main_module="main.py", modules={"main.py": MAIN, "mod.wasm": {"wasm": b"\0asm"}}
    )
    with pytest.raises(WorkerLoadError) as info:
        await loader.load(code)
    assert str(info.value).startswith("ValueError: module 'mod.wasm': 'wasm' is not a module type")
    assert '{"text": str} or {"data": bytes}' in str(info.value)  # the forms it takes


@pytest.mark.parametrize(
    ("modules", "needle"),
    [
        ({"main": MAIN}, "Python source goes in an entry whose name ends in .py (main.py)"),
        ({"main.py": MAIN, "d.bin": {"data": "abc"}}, "{'data': ...} takes bytes"),
        ({"main.py": MAIN, "n.txt": {"text": 5}}, "{'text': ...} takes str, not int"),
        ({"mian.py": MAIN}, "its entries: ['mian.py']"),
    ],
)
async def test_a_malformed_module_map_says_what_it_takes(
    loader: Loader, modules: dict[str, object], needle: str
) -> None:
    main = "main" if "main" in modules else "main.py"
    with pytest.raises(WorkerLoadError) as info:
        await loader.load(WorkerCode(main_module=main, modules=modules))
    assert needle in str(info.value)


async def test_a_missing_env_name_lists_what_env_holds(loader: Loader) -> None:
    source = "from workers import WorkerEntrypoint\n\nclass Default(WorkerEntrypoint):\n"
    source += "    async def get(self):\n        return self.env.KVV\n"
    code = WorkerCode(main_module="main.py", modules={"main.py": source}, env={"KV": 1})
    with pytest.raises(AttributeError) as info:
        await loader.get("w", lambda: code).get_entrypoint().get()
    assert str(info.value).startswith("env has no 'KVV': the worker's env holds ['KV']")


async def test_an_import_time_error_names_the_users_file_and_line(loader: Loader) -> None:
    code = WorkerCode(
        main_module="main.py",
        modules={
            "main.py": "import helpers\n",
            "helpers.py": "x = 1\n\nraise RuntimeError('boom')\n",
        },
    )
    with pytest.raises(WorkerLoadError, match=exact("helpers.py:3: RuntimeError: boom")) as info:
        await loader.load(code)
    assert (info.value.file, info.value.line) == ("helpers.py", 3)


async def test_a_main_module_error_at_import_names_main_and_its_line(loader: Loader) -> None:
    code = WorkerCode(main_module="main.py", modules={"main.py": "a = 1\nb = {}['nope']\n"})
    with pytest.raises(WorkerLoadError, match=exact("main.py:2: KeyError: 'nope'")) as info:
        await loader.load(code)
    assert (info.value.file, info.value.line) == ("main.py", 2)


# ---------------------------------------------------------------------------------------------
# A module-level fetch


async def test_a_module_level_fetch_is_the_default_entrypoint(loader: Loader) -> None:
    source = (
        "from workers import Response\n"
        "\n"
        "async def fetch(request, env, ctx):\n"
        "    text = f'{env.NAME} {request.method} {request.url} {ctx.props}'\n"
        "    return Response(text, status=201)\n"
    )
    stub = loader.get(
        "w",
        lambda: WorkerCode(main_module="main.py", modules={"main.py": source}, env={"NAME": "n"}),
    )
    response = await stub.fetch("https://example.com/path")
    assert response.status == 201
    assert await response.text() == "n GET https://example.com/path {}"
    response = await stub.get_entrypoint(props={"p": 1}).fetch("https://e/")
    assert await response.text() == "n GET https://e/ {'p': 1}"


# ---------------------------------------------------------------------------------------------
# Module state


async def test_module_state_persists_in_a_warm_worker_and_is_fresh_after_evict(
    loader: Loader,
) -> None:
    factory = Counted()
    assert [await api(loader.get("w", factory)).count() for _ in range(3)] == [1, 2, 3]
    await loader.evict("w")
    assert await api(loader.get("w", factory)).count() == 1
    assert factory.calls == 2


# ---------------------------------------------------------------------------------------------
# Logs


async def test_the_stub_tells_each_calls_cpu_time_as_the_host_measured_it(
    loader: Loader,
) -> None:
    stub = loader.get("w", api_code)
    worker = api(stub)
    assert await worker.count() == 1
    assert stub.cpu_ms > 0  # this first call's includes loading the code
    assert await worker.burn(0.08) == "burnt"
    assert stub.cpu_ms >= 80
    assert await worker.count() == 2
    assert 0 < stub.cpu_ms < 80
    with pytest.raises(ValueError, match=BAD):
        await worker.print_then_fail()
    assert 0 < stub.cpu_ms < 80
    # A worker that under-reports is held to the host's own reading, which lags a running
    # process by at most a scheduler tick (4 ms at 250 Hz).
    assert await worker.burn_and_lie(0.08) == "burnt"
    assert stub.cpu_ms >= 70
    # Nor can it claim a huge figure to make its later calls look free.
    assert await worker.burn_and_lie(0.01, 2**62) == "burnt"
    assert stub.cpu_ms < 40
    assert await worker.burn_and_lie(0.08, 2**62) == "burnt"
    assert stub.cpu_ms >= 70


async def test_a_result_that_cannot_cross_names_where_it_sits_in_the_result(
    loader: Loader,
) -> None:
    with pytest.raises(DataCloneError, match=r"^result\['ok'\]\[1\]: cannot clone a generator"):
        await api(loader.get("w", api_code)).unclonable()


async def test_print_logging_and_warnings_appear_in_the_stubs_logs(loader: Loader) -> None:
    stub = loader.get("w", api_code)
    assert await api(stub).talk() == "done"
    line = MAIN.splitlines().index('        warnings.warn("careful")') + 1
    assert stub.logs == [
        "printed",
        "WARNING:root:logged",
        f"main.py:{line}: UserWarning: careful",
    ]


async def test_each_call_shows_its_own_warnings(loader: Loader) -> None:
    stub = loader.get("w", api_code)
    line = MAIN.splitlines().index('        warnings.warn("again")') + 1
    for _ in range(3):  # Python's "default" action alone would show it on the first call only
        assert await api(stub).warn_again() == "warned"
        assert stub.logs == [f"main.py:{line}: UserWarning: again"]


@pytest.mark.parametrize(
    ("how", "error"),
    [("sys.exit", "SystemExit: 3"), ("raise", "KeyboardInterrupt: "), ("own", "Stop: mine")],
)
async def test_sys_exit_in_a_call_fails_the_call_not_the_worker(
    loader: Loader, how: str, error: str
) -> None:
    stub = loader.get("w", api_code)
    assert await api(stub).count() == 1
    with pytest.raises(WorkerError, match=exact(error)) as info:
        await api(stub).exit(how)
    assert info.value.logs == ["leaving"]
    assert "in exit" in info.value.traceback
    assert await api(stub).count() == 2  # the same warm worker


async def test_an_exception_carries_what_was_printed_before_it(loader: Loader) -> None:
    stub = loader.get("w", api_code)
    with pytest.raises(ValueError, match=BAD) as builtin:
        await api(stub).print_then_fail()
    assert builtin.value.logs == ["before"]  # type: ignore[attr-defined]
    with pytest.raises(WorkerError, match=r"^QuotaError: over quota$") as custom:
        await api(stub).print_then_fail_custom()
    assert custom.value.logs == ["before custom"]


async def test_output_over_the_limit_cannot_be_swallowed_by_except_exception(
    loader: Loader,
) -> None:
    stub = loader.get("w", lambda: api_code(output_bytes=1000))
    with pytest.raises(
        OutputLimitExceeded, match=exact("the call wrote more than 1000 characters of output")
    ):
        await api(stub).flood()


async def test_after_output_over_the_limit_the_next_call_gets_a_fresh_worker(
    loader: Loader,
) -> None:
    stub = loader.get("w", lambda: api_code(output_bytes=1000))
    assert await api(stub).count() == 1
    with pytest.raises(OutputLimitExceeded):
        await api(stub).flood()
    assert await api(stub).count() == 1  # LimitExceeded: "the next call gets a fresh worker"


# ---------------------------------------------------------------------------------------------
# Outbound network


async def test_fetch_without_global_outbound_is_a_permission_error(loader: Loader) -> None:
    with pytest.raises(
        PermissionError, match=r"^This worker has no outbound network: .*global_outbound=None"
    ):
        await api(loader.get("w", api_code)).fetch_out()


# ---------------------------------------------------------------------------------------------
# The Loader's cache


async def test_the_same_id_gives_the_same_stub_and_runs_the_factory_once(loader: Loader) -> None:
    factory = Counted()
    first = loader.get("w", factory)
    assert await api(first).count() == 1
    second = loader.get("w", factory)
    assert second is first
    assert await api(second).count() == 2
    assert factory.calls == 1


async def test_no_id_gives_a_new_uncached_worker_each_time(loader: Loader) -> None:
    factory = Counted()
    first, second = loader.get(None, factory), loader.get(None, factory)
    assert first is not second
    assert await api(first).count() == 1
    assert await api(second).count() == 1
    assert factory.calls == 2
    await first.aclose()
    await second.aclose()


async def test_max_workers_evicts_the_least_recently_used(tmp_path: Path) -> None:
    a, b, c = Counted(), Counted(), Counted()
    async with Loader(tmp_path / "data", pool_size=2, max_workers=2) as loader:
        assert await api(loader.get("a", a)).count() == 1
        assert await api(loader.get("b", b)).count() == 1
        assert await api(loader.get("a", a)).count() == 2  # a is now more recent than b
        assert await api(loader.get("c", c)).count() == 1  # evicts b
        assert await api(loader.get("a", a)).count() == 3  # a stayed warm
        assert await api(loader.get("b", b)).count() == 1  # b starts again
        assert (a.calls, b.calls, c.calls) == (1, 2, 1)


async def test_an_idle_worker_is_stopped_after_its_ttl(tmp_path: Path) -> None:
    factory = Counted()
    async with Loader(tmp_path / "data", pool_size=2, idle_ttl_s=0.3) as loader:
        assert await api(loader.get("w", factory)).count() == 1
        await asyncio.sleep(1.0)
        assert await api(loader.get("w", factory)).count() == 1
        assert factory.calls == 2


async def test_a_worker_busy_in_a_call_is_not_idle(tmp_path: Path) -> None:
    # The call blocks without suspending: the reaper sees a worker whose last call started
    # more than idle_ttl_s ago, but that call is still running.
    async with Loader(tmp_path / "data", pool_size=2, idle_ttl_s=0.3) as loader:
        assert await api(loader.get("w", api_code)).block(1.0) == "blocked"


async def test_entrypoints_imported_into_the_main_module_are_exported(loader: Loader) -> None:
    app = (
        "from workers import WorkerEntrypoint\n"
        "class Default(WorkerEntrypoint):\n"
        "    async def hello(self):\n"
        "        return 'default'\n"
        "class Calculator(WorkerEntrypoint):\n"
        "    async def add(self, a, b):\n"
        "        return a + b\n"
    )
    main = "from app import Default, Calculator\nfrom app import Calculator as _Hidden\n"
    stub = await loader.load(
        WorkerCode(main_module="main.py", modules={"main.py": main, "app.py": app})
    )
    assert await stub.get_entrypoint().hello() == "default"
    assert await stub.get_entrypoint("Calculator").add(2, 3) == 5
    with pytest.raises(
        LookupError, match=r"no entrypoint '_Hidden' \(it exports \['Default', 'Calculator'\]\)"
    ):
        await stub.get_entrypoint("_Hidden").add(2, 3)


async def test_a_main_module_without_an_entrypoint_is_a_load_error(loader: Loader) -> None:
    with pytest.raises(
        WorkerLoadError,
        match=r"^main.py: ValueError: the main module exports no entrypoint: define class "
        r"Default\(WorkerEntrypoint\)",
    ):
        await loader.load(WorkerCode(main_module="main.py", modules={"main.py": "x = 1\n"}))


async def test_load_raises_load_errors_eagerly_and_returns_a_working_stub(loader: Loader) -> None:
    with pytest.raises(WorkerLoadError, match=exact("main.py:2: SyntaxError: invalid syntax")):
        await loader.load(WorkerCode(main_module="main.py", modules={"main.py": "x = 1\ndef (\n"}))
    stub = await loader.load(api_code())
    assert await api(stub).count() == 1
    assert await api(stub).count() == 2
    await stub.aclose()


# ---------------------------------------------------------------------------------------------
# Errors


async def test_a_builtin_exception_arrives_as_itself(loader: Loader) -> None:
    with pytest.raises(ValueError, match=BAD) as info:
        await api(loader.get("w", api_code)).print_then_fail()
    assert type(info.value) is ValueError
    assert info.value.args == ("bad",)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "workerloader" not in notes


async def test_a_custom_exception_is_a_worker_error_with_a_user_only_traceback(
    loader: Loader,
) -> None:
    with pytest.raises(WorkerError, match=r"^QuotaError: over quota$") as info:
        await api(loader.get("w", api_code)).print_then_fail_custom()
    error = info.value
    assert (error.type_name, error.message) == ("QuotaError", "over quota")
    line = MAIN.splitlines().index('        raise QuotaError("over quota")') + 1
    assert f'File "main.py", line {line}, in print_then_fail_custom' in error.traceback
    assert "workerloader" not in error.traceback
    assert error.traceback.endswith("QuotaError: over quota\n")


async def test_output_over_the_limit_fails_the_call_even_if_base_exception_is_swallowed(
    loader: Loader,
) -> None:
    stub = loader.get("w", lambda: api_code(output_bytes=1000))
    with pytest.raises(OutputLimitExceeded):
        await api(stub).flood_swallowing_everything()


async def _until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "not within the time allowed"
        await asyncio.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("how", ["wait_until", "create_task"])
async def test_work_left_running_after_a_call_is_held_to_cpu_ms(loader: Loader, how: str) -> None:
    stub = loader.get("w", lambda: api_code(cpu_ms=100))
    assert await api(stub).count() == 1
    assert await api(stub).leave_running(how) == "answered"
    worker = stub._worker
    assert worker is not None
    await _until(lambda: not _alive(worker.process.pid))
    assert await api(stub).count() == 1  # a fresh worker, which says why
    assert stub.logs == [
        "[workerloader] a fresh worker: the last one was stopped: work left running after a "
        "call (ctx.wait_until, a task) used more than 100 ms of CPU"
    ]


async def test_work_left_running_within_cpu_ms_is_left_alone(loader: Loader) -> None:
    stub = loader.get("w", lambda: api_code(cpu_ms=100))
    for _ in range(3):  # 20 ms of CPU after each call
        assert await api(stub).leave_briefly() == "answered"
        await asyncio.sleep(0.3)
    assert await api(stub).count() == 1
    assert stub.logs == []


async def test_an_uncached_worker_stops_when_its_stub_is_dropped(loader: Loader) -> None:
    stub = loader.get(None, api_code)
    assert await api(stub).count() == 1
    assert stub._worker is not None
    pid = stub._worker.process.pid
    del stub
    gc.collect()
    await _until(lambda: not _alive(pid) and not loader._workers)


async def test_an_uncached_worker_is_stopped_after_the_idle_ttl(tmp_path: Path) -> None:
    async with Loader(tmp_path / "data", pool_size=2, idle_ttl_s=0.3) as loader:
        stub = await loader.load(api_code())
        assert await api(stub).count() == 1
        assert stub._worker is not None
        pid = stub._worker.process.pid
        await _until(lambda: not _alive(pid))
        assert await api(stub).count() == 1  # held, the stub starts a fresh one


async def test_lru_eviction_lets_a_call_in_flight_finish(tmp_path: Path) -> None:
    async with Loader(tmp_path / "data", pool_size=2, max_workers=1) as loader:
        busy = asyncio.ensure_future(api(loader.get("a", api_code)).block(0.5))
        await asyncio.sleep(0.2)
        assert await api(loader.get("b", api_code)).count() == 1  # evicts a from the cache
        assert await busy == "blocked"


async def test_uncached_workers_leave_no_fds_after_the_loader_closes(tmp_path: Path) -> None:
    gc.collect()  # sockets an earlier test left to the collector would close mid-test
    before = len(os.listdir("/proc/self/fd"))
    async with Loader(tmp_path / "data", pool_size=2) as loader:
        for _ in range(5):
            assert await api(loader.get(None, api_code)).count() == 1
        await api(await loader.load(api_code())).count()
    await asyncio.sleep(0.1)
    assert len(os.listdir("/proc/self/fd")) == before


FORGED = """
from workers import WorkerEntrypoint


class Default(WorkerEntrypoint):
    async def raise_named(self, name):
        raise type(name, (Exception,), {})("the code's own class")
"""


@pytest.mark.parametrize(
    "name", ["MemoryError", "OutputLimitExceeded", "PermissionDenied", "ValueError"]
)
async def test_the_codes_own_class_named_like_ours_arrives_as_a_worker_error(
    loader: Loader, name: str
) -> None:
    # Taken by its name alone it would pass for a limit the host enforced (billing, alerts,
    # retries) or a binding's refusal.
    code = WorkerCode(main_module="main.py", modules={"main.py": FORGED})
    with pytest.raises(WorkerError) as info:
        await loader.get("w", lambda: code).get_entrypoint().raise_named(name)
    assert (info.value.type_name, info.value.message) == (name, "the code's own class")


# ---------------------------------------------------------------------------------------------
# Response.json: a constructor on the class, a reader on a response (as the Fetch API has both)

JSON_BOTH_WAYS = """
from workers import Response, WorkerEntrypoint

class Default(WorkerEntrypoint):
    async def fetch(self, request):
        made = Response.json({"n": 1}, status=201, headers={"x-a": "b"})
        read = await Response('{"read": [1, 2]}').json()  # as after fetch(...)
        return Response.json({"made": [made.status, made.headers, await made.json()], **read})
"""


async def test_response_json_makes_one_and_reads_one(loader: Loader) -> None:
    stub = loader.get(
        "j", lambda: WorkerCode(main_module="main.py", modules={"main.py": JSON_BOTH_WAYS})
    )
    response = await stub.fetch("https://j/")
    assert response.headers["content-type"] == "application/json"
    assert await response.json() == {
        "made": [201, {"content-type": "application/json", "x-a": "b"}, {"n": 1}],
        "read": [1, 2],
    }
