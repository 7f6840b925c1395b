"""End-to-end HTTP benchmark against Cloudflare's workerd, driven by one load client.

Both servers run on loopback: ``workerloader serve`` and ``workerd serve --experimental`` with a
main worker that uses a Worker Loader binding. Cold: a new worker per request (ours:
``POST /execute``; workerd: ``LOADER.get`` with a new id). Warm: the same worker (ours: a
stored worker's fetch; workerd: the same id). The client is a small raw HTTP/1.1 keep-alive
client, the same for both, so neither server is measured through a different client.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ._report import Figure, percentile

__all__ = ["run_http_bench"]

_WORKERD_MAIN = """
const CODE = "export default { async fetch(request) { return new Response('4'); } }";
export default {
  async fetch(request, env) {
    const id = new URL(request.url).searchParams.get("id") || "warm";
    const worker = env.LOADER.get(id, () => ({
      compatibilityDate: "2025-01-01", mainModule: "w.js", modules: { "w.js": CODE },
    }));
    return worker.getEntrypoint().fetch(request);
  },
};
"""
_WORKERD_CONFIG = """
using Workerd = import "/workerd/workerd.capnp";
const config :Workerd.Config = (
  services = [ (name = "main", worker = .mainWorker) ],
  sockets = [ (name = "http", address = "127.0.0.1:PORT", http = (), service = "main") ],
);
const mainWorker :Workerd.Worker = (
  modules = [ (name = "main.js", esModule = embed "main.js") ],
  compatibilityDate = "2025-01-01",
  bindings = [ (name = "LOADER", workerLoader = ()) ],
);
"""
_OUR_WORKER = {
    "main_module": "main.py",
    "modules": {
        "main.py": "from workers import WorkerEntrypoint, Response\n\n"
        "class Default(WorkerEntrypoint):\n"
        "    async def fetch(self, request):\n"
        "        return Response('4')\n"
    },
}

Request = Callable[[int], bytes]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(path: str) -> Request:
    return lambda i: f"GET {path.format(i=i)} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()


def _post(path: str, body: bytes) -> Request:
    head = f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n\r\n"
    return lambda i: head.encode() + body


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> bytes:
    writer.write(data)
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await reader.readexactly(length)
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected answer: {head[:60]!r} {body[:200]!r}")
    return body


async def _latencies(port: int, request: Request, count: int) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    samples = []
    for i in range(count):
        start = time.perf_counter()
        await _exchange(reader, writer, request(i))
        samples.append((time.perf_counter() - start) * 1000)
    writer.close()
    return samples


async def _throughput(port: int, request: Request, connections: int, seconds: float) -> float:
    done = 0
    deadline = time.perf_counter() + seconds
    counter = iter(range(10**9))

    async def lane() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < deadline:
            await _exchange(reader, writer, request(next(counter)))
            done += 1
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(connections)))
    return done / (time.perf_counter() - start)


def _wait_port(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not start")


def _workerd_binary(cache: Path) -> Path | None:
    """workerd from npm (installed into ``cache`` once), or None without node/npm."""
    binary = cache / "node_modules" / ".bin" / "workerd"
    if binary.exists():
        return binary
    if shutil.which("npm") is None:
        return None
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "workerd"],
        cwd=cache,
        check=True,
        capture_output=True,
        timeout=600,
    )
    return binary if binary.exists() else None


async def _measure(port: int, cold: Request, warm: Request, counts: tuple[int, int]) -> list[float]:
    cold_ms = await _latencies(port, cold, counts[0])
    cold_rate = await _throughput(port, cold, 4, 3.0)
    await _latencies(port, warm, 50)  # warm it up
    warm_ms = await _latencies(port, warm, counts[1])
    warm_rate = await _throughput(port, warm, 4, 3.0)
    return [percentile(cold_ms, 0.5), cold_rate, percentile(warm_ms, 0.5), warm_rate]


def run_http_bench(
    cache: Path = Path(".workerloader/bench"),
    cold: int = 300,
    warm: int = 2000,
    *,
    service_python: str | None = None,
    sandbox_python: str | None = None,
) -> list[Figure]:
    """Cold and warm HTTP figures of workerloader beside workerd's, same client, same run.
    The service runs on ``service_python`` (default: this interpreter), its workers on
    ``sandbox_python`` (default: the service's)."""
    sandbox = ["--sandbox-python", sandbox_python] if sandbox_python else []
    with tempfile.TemporaryDirectory() as tmp:
        ours_port = _free_port()
        errors = open(Path(tmp) / "serve.err", "wb")  # noqa: SIM115 - the service's lifetime
        empty_config = Path(tmp) / "workerloader.toml"
        empty_config.write_text("")
        ours = subprocess.Popen(
            [
                service_python or sys.executable,
                "-m",
                "workerloader.cli",
                "serve",
                "--port",
                str(ours_port),
                "--data-dir",
                str(Path(tmp) / "data"),
                "--config",  # its embedded defaults, whatever ./workerloader.toml says
                str(empty_config),
                *sandbox,
            ],
            stdout=subprocess.DEVNULL,
            stderr=errors,
        )
        try:
            try:
                _wait_port(ours_port, ours, "workerloader serve")
            except RuntimeError as exc:  # with what the service said (a refused sandbox, say)
                said = Path(errors.name).read_text(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(f"{exc}: {' / '.join(said)}") from None
            body = json.dumps(_OUR_WORKER).encode()

            async def store_worker() -> None:
                reader, writer = await asyncio.open_connection("127.0.0.1", ours_port)
                await _exchange(
                    reader, writer, _post("/workers/bench", body)(0).replace(b"POST", b"PUT", 1)
                )
                writer.close()

            asyncio.run(store_worker())
            ours_figures = asyncio.run(
                _measure(
                    ours_port,
                    _post("/execute", b'{"code": "return 4"}'),
                    _get("/workers/bench/fetch/"),
                    (cold, warm),
                )
            )
        finally:
            ours.terminate()
            ours.wait(timeout=30)
            errors.close()
        theirs_figures: list[float | None] = [None] * 4
        note = "workerd"
        binary = _workerd_binary(cache.resolve() / "workerd")
        if binary is None:
            note = "workerd not run: node/npm missing"
        else:
            wd_port = _free_port()
            (Path(tmp) / "main.js").write_text(_WORKERD_MAIN)
            (Path(tmp) / "config.capnp").write_text(_WORKERD_CONFIG.replace("PORT", str(wd_port)))
            theirs = subprocess.Popen(
                [str(binary), "serve", "config.capnp", "--experimental"],
                cwd=tmp,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                _wait_port(wd_port, theirs, "workerd")
                theirs_figures = list(
                    asyncio.run(
                        _measure(wd_port, _get("/?id=cold{i}"), _get("/?id=warm"), (cold, warm))
                    )
                )
            finally:
                theirs.terminate()
                theirs.wait(timeout=30)
    names = [
        ("cold p50 (new worker per request)", "ms", 3.0, False),
        ("new workers/s (4 connections)", "/s", 300.0, True),
        ("warm p50 (same worker)", "ms", 0.6, False),
        ("warm requests/s (4 connections)", "/s", 3000.0, True),
    ]
    return [
        Figure(name, value, unit, theirs, note, target=target, higher_is_better=higher)
        for (name, unit, target, higher), value, theirs in zip(
            names, ours_figures, theirs_figures, strict=True
        )
    ]
