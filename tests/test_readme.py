"""Every ```python block of README.md runs as a script and exits cleanly.

A block right after a line `<!-- not-tested -->` is skipped (for code that needs something a
test machine does not have); use it sparingly.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
SKIP_MARK = "<!-- not-tested -->"


def python_blocks(text):
    """`(section heading, code, skipped)` for each ```python block, in order."""
    blocks = []
    heading = "top"
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.strip() == "```python":
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            previous = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            blocks.append((heading, "\n".join(lines[i + 1 : end]) + "\n", previous == SKIP_MARK))
            i = end
        i += 1
    return blocks


BLOCKS = python_blocks(README.read_text()) if README.exists() else []


def _id(index):
    heading = BLOCKS[index][0]
    return f"{index}-" + re.sub(r"[^A-Za-z0-9]+", "-", heading).strip("-").lower()


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 10
    assert sum(skipped for *_, skipped in BLOCKS) <= 2, "skip README blocks sparingly"


def test_block_parser():
    text = "# A\n```python\nprint(1)\n```\n<!-- not-tested -->\n\n```python\nx\n```\n```\nshell\n```\n"
    assert python_blocks(text) == [("A", "print(1)\n", False), ("A", "x\n", True)]


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=_id)
def test_readme_block_runs(index, tmp_path):
    heading, code, skipped = BLOCKS[index]
    if skipped:
        pytest.skip(f"marked {SKIP_MARK} in the README")
    script = tmp_path / f"readme_block_{index}.py"
    script.write_text(code)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=50, cwd=tmp_path
    )
    assert done.returncode == 0, f"README block {index} ({heading}) failed:\n{done.stdout}\n{done.stderr}"
