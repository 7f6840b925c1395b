"""Every Python sample in README.md and docs/ runs, in a fresh interpreter, and prints exactly
what its comments say (``print(...)  # expected output``)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SAMPLES = [
    (page.relative_to(ROOT).as_posix(), i, sample)
    for page in PAGES
    for i, sample in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))
]


def test_readme_and_docs_have_samples() -> None:
    pages = {page for page, _, _ in SAMPLES}
    assert "README.md" in pages
    assert len(pages) >= 4


@pytest.mark.parametrize(
    ("page", "index", "sample"), SAMPLES, ids=[f"{p}-{i}" for p, i, _ in SAMPLES]
)
def test_sample_runs_and_prints_what_it_says(
    page: str, index: int, sample: str, tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", sample],
        cwd=tmp_path,  # a Loader's default data dir lands here, not in the checkout
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    expected = [m.strip() for m in re.findall(r"print\(.*\)\s+#\s*(.+)", sample)]
    assert expected, "a sample should say what it prints"
    assert result.stdout.splitlines() == expected
    if "Loader(" in sample:  # a reader runs it again: the data it stored must not change it
        again = subprocess.run(
            [sys.executable, "-c", sample], cwd=tmp_path, capture_output=True, text=True
        )
        assert again.stdout.splitlines() == expected, again.stderr
