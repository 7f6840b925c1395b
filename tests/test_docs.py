"""Every Python sample in docs/ runs, in a fresh interpreter, and prints what its comments
say (``print(...)  # expected``)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
SAMPLES = [
    (page.name, i, sample)
    for page in sorted(DOCS.glob("*.md"))
    for i, sample in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))
]


def test_the_docs_have_samples() -> None:
    assert len(SAMPLES) >= 3


@pytest.mark.parametrize(
    ("page", "index", "sample"), SAMPLES, ids=[f"{p}-{i}" for p, i, _ in SAMPLES]
)
def test_docs_sample_runs_and_prints_what_it_says(
    page: str, index: int, sample: str, tmp_path: Path
) -> None:
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
    assert expected, "a sample should say what it prints"
    assert result.stdout.splitlines() == expected
