"""README's curl session, as written there, run with curl against the service: each answer is
the one README shows (timings aside). Edit README's session and this test follows it."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import shlex
from pathlib import Path

import httpx

README = Path(__file__).resolve().parents[2] / "README.md"
TIMINGS = {"duration_ms", "cpu_ms"}


def readme_session() -> list[tuple[list[str], dict[str, object]]]:
    """The curl commands of README's first console block under "## The service", each with
    the JSON answer README shows for it."""
    section = README.read_text().split("## The service", 1)[1]
    block = re.search(r"```console\n(.*?)```", section, flags=re.S)
    assert block is not None, "README has no console session under '## The service'"
    lines = block.group(1).replace("\\\n", " ").splitlines()
    session = []
    for command, answer in itertools.pairwise(lines):
        if command.startswith("$ curl "):
            session.append((shlex.split(command[2:]), json.loads(answer)))
    return session


async def test_readmes_curl_session_answers_as_readme_says(client: httpx.AsyncClient) -> None:
    session = readme_session()
    assert [argv[-1] for argv, _ in session][:1] == ["localhost:8787/health"]
    address = f"{client.base_url.host}:{client.base_url.port}"
    for argv, shown in session:
        command = [arg.replace("localhost:8787", address) for arg in argv]
        process = await asyncio.create_subprocess_exec(
            *command, "--silent", "--show-error", stdout=asyncio.subprocess.PIPE
        )
        out, _ = await process.communicate()
        assert process.returncode == 0, command
        answer = json.loads(out)
        assert {k: v for k, v in answer.items() if k not in TIMINGS} == {
            k: v for k, v in shown.items() if k not in TIMINGS
        }, command
        for key in TIMINGS & set(shown):
            assert isinstance(answer[key], float), (key, answer)
            assert answer[key] > 0, (key, answer)
