"""Service bindings in the real sandbox: loopback exports, worker-to-worker calls, host
capabilities in env, and the subrequest limit."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from workerloader import (
    LimitExceeded,
    Limits,
    Loader,
    SubrequestLimitExceeded,
    WorkerCode,
    WorkerEntrypoint,
)

MAIN = """
from workers import WorkerEntrypoint, Response, sdk


class Default(WorkerEntrypoint):
    async def fetch(self, request):
        return Response("hello " + request.url, status=201)


class Calc(WorkerEntrypoint):
    async def add(self, a, b):
        return a + b

    async def _private(self):
        return "never"


class Api(WorkerEntrypoint):
    async def audit(self, what):
        return await self.env.AUDIT.log(what)

    async def audit_private(self):
        return await self.env.AUDIT._secret()

    async def add_elsewhere(self, a, b):
        return await self.env.CALC.add(a, b)

    async def call_elsewhere(self, method):
        return await getattr(self.env.CALC, method)()

    async def fetch_elsewhere(self, url):
        response = await self.env.WEB.fetch(url)
        return [await response.status, await response.text()]

    async def slow_query(self):
        await sdk.sql.prepare(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
            "SELECT count(*) FROM c"
        ).all()

    async def many_kv_gets(self, n):
        for _ in range(n):
            await sdk.kv.get("k")
        return n

    async def kv_gets_swallowing(self, n, catch):
        caught = []
        for _ in range(n):
            try:
                await sdk.kv.get("k")
            except (BaseException if catch == "BaseException" else Exception) as exc:
                caught.append(type(exc).__name__)
        print("caught", caught)
        return caught
"""


@pytest.fixture
async def loader(tmp_path: Path) -> AsyncIterator[Loader]:
    async with Loader(tmp_path / "data", pool_size=2) as loader:
        yield loader


def code(env: dict[str, object] | None = None, **limits: int) -> WorkerCode:
    return WorkerCode(
        main_module="main.py",
        modules={"main.py": MAIN},
        env=env or {},
        limits=Limits(**limits) if limits else Limits(),
    )


def api(loader: Loader, worker_id: str, env: dict[str, object], **limits: int) -> Any:
    return loader.get(worker_id, lambda: code(env, **limits)).get_entrypoint("Api")


async def test_a_loopback_export_runs_in_the_host_with_host_bound_props(loader: Loader) -> None:
    seen: list[tuple[dict[str, object], str]] = []

    @loader.export
    class Audit(WorkerEntrypoint):
        async def log(self, what: str) -> str:
            seen.append((self.ctx.props, what))
            return "logged"

        async def _secret(self) -> str:
            return "never"

    one = api(loader, "one", {"AUDIT": loader.exports.Audit(props={"tenant": "t1"})})
    two = api(loader, "two", {"AUDIT": loader.exports.Audit(props={"tenant": "t2"})})
    assert await one.audit("a") == "logged"
    assert await two.audit("b") == "logged"
    assert seen == [({"tenant": "t1"}, "a"), ({"tenant": "t2"}, "b")]
    with pytest.raises(AttributeError, match=r"^_secret \(names starting with '_' are never"):
        await one.audit_private()


async def test_an_unknown_export_is_a_clear_error(loader: Loader) -> None:
    with pytest.raises(AttributeError, match=r"^no export named 'Nope'; register it"):
        loader.exports.Nope(props={})


async def test_one_worker_calls_another_workers_entrypoint(loader: Loader) -> None:
    other = loader.get("other", code)
    caller = api(loader, "caller", {"CALC": other.get_entrypoint("Calc")})
    assert await caller.add_elsewhere(2, 3) == 5
    with pytest.raises(AttributeError, match=r"^_private \(names starting with '_' are never"):
        await caller.call_elsewhere("_private")
    with pytest.raises(AttributeError, match=r"entrypoint 'Calc' has no method 'nope'"):
        await caller.call_elsewhere("nope")


async def test_one_worker_fetches_from_another(loader: Loader) -> None:
    other = loader.get("other", code)
    caller = api(loader, "caller", {"WEB": other.get_entrypoint()})
    assert await caller.fetch_elsewhere("https://other/x") == [201, "hello https://other/x"]


async def test_binding_calls_count_toward_the_subrequest_limit(loader: Loader) -> None:
    sdk = loader.sdk("t")
    stub = api(loader, "w", {"SDK": sdk}, subrequests=10)
    assert await stub.many_kv_gets(10) == 10  # the limit is per call: each call starts at 0
    assert await stub.many_kv_gets(10) == 10
    with pytest.raises(
        SubrequestLimitExceeded, match=r"more than 10 binding calls \(Limits.subrequests\)"
    ) as info:
        await stub.many_kv_gets(11)
    assert isinstance(info.value, LimitExceeded)
    assert "Traceback" not in str(info.value)


@pytest.mark.parametrize("catch", ["Exception", "BaseException"])
async def test_the_subrequest_limit_fails_the_call_whatever_the_code_catches(
    loader: Loader, catch: str
) -> None:
    stub = api(loader, "w", {"SDK": loader.sdk("t")}, subrequests=3)
    with pytest.raises(SubrequestLimitExceeded) as info:
        await stub.kv_gets_swallowing(5, catch)
    if catch == "BaseException":  # the code went on, and what it printed reaches the caller
        assert info.value.logs == [  # type: ignore[attr-defined]
            "caught ['SubrequestLimitExceeded', 'SubrequestLimitExceeded']"
        ]
    # The worker that went over is gone: a fresh one answers the next call.
    assert await stub.kv_gets_swallowing(3, catch) == []


async def test_a_long_query_ends_at_the_calling_workers_deadline(loader: Loader) -> None:
    """The SQL binding's own deadline is 5 s; the worker's wall time is 0.5 s. The worker is
    killed at its deadline, and its statement, which runs in the host, is interrupted then
    too instead of holding the database for 5 s."""
    import time

    from workerloader import BindingError, WallTimeExceeded

    stub = api(loader, "w", {"SDK": loader.sdk("t")}, wall_ms=500)
    # Both end at the same moment: either the worker reports the interrupted statement
    # or the host's watchdog kills it first.
    with pytest.raises((WallTimeExceeded, BindingError)) as info:
        await stub.slow_query()
    if isinstance(info.value, BindingError):
        assert str(info.value) == (
            "SQL statement interrupted: the calling worker's wall time ran out"
        )
    started = time.monotonic()
    assert await loader.sql("t").prepare("SELECT 1 AS one").first("one") == 1
    assert time.monotonic() - started < 2
