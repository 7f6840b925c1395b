"""Every Python sample in README.md runs, in a fresh interpreter, and prints what it says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_samples() -> None:
    assert len(SAMPLES) >= 2


@pytest.mark.parametrize("sample", SAMPLES, ids=[f"sample{i}" for i in range(len(SAMPLES))])
def test_readme_sample_runs_and_prints_what_its_comments_say(sample: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", sample],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    expected = [m.strip() for m in re.findall(r"print\(.*\)\s+#\s*(.+)", sample)]
    printed = result.stdout.splitlines()
    for want in expected:
        if want.startswith("one round trip"):
            continue  # a remark, not an output
        assert want in printed
    assert printed
