"""Rules for the code blocks of README.md and docs/*.md, which pytest-codeblocks runs as tests (`--codeblocks`).

pytest-codeblocks runs a bash block with `bash -c`, whose status is the last command's: a block of several
commands must start with `set -e` for an earlier failure to fail the test. Every skipped block gives a reason.
"""

from pathlib import Path

import pytest

pytest_codeblocks = pytest.importorskip("pytest_codeblocks")

REPO_ROOT = Path(__file__).resolve().parents[2]
MARKDOWN = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def blocks():
    for path in MARKDOWN:
        for block in pytest_codeblocks.extract_from_file(path):
            yield pytest.param(block, id=f"{path.relative_to(REPO_ROOT)}:{block.lineno}")


@pytest.mark.parametrize("block", list(blocks()))
def test_block_rules(block):
    assert block.syntax, "a fence without a language: use ```text for diagrams and output"
    for mark in block.marks:
        if mark.startswith("pytest.mark.skip"):
            assert "reason=" in mark, "a skipped block must say why"
    if block.syntax in ("bash", "sh"):
        commands = [line for line in block.code.splitlines()
                    if line.strip() and not line.lstrip().startswith("#") and not line.startswith((" ", "\t"))]
        if len(commands) > 1 and not any(m.startswith("pytest.mark.skip") for m in block.marks):
            assert commands[0].startswith("set -e"), "a bash block of several commands must start with `set -e`"
