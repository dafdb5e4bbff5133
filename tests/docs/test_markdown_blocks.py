"""Rules for the code blocks of README.md and docs/*.md, which pytest-codeblocks runs as tests (`--codeblocks`).

Bash blocks are meant to be pasted into an interactive shell, so none sets `-e` (which would close the user's
shell at the first error); the repository's conftest.py runs each one under `set -eo pipefail` instead, so that
an earlier failing command still fails the test. Every skipped block gives a reason.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest_codeblocks = pytest.importorskip("pytest_codeblocks")

REPO_ROOT = Path(__file__).resolve().parents[2]
MARKDOWN = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
# `set -e`, `set -euo pipefail`, `set -o errexit`, ... at the top level of a block.
SETS_ERREXIT = re.compile(r"^set\s+(-\w*e|(-\w+\s+)*-o\s+errexit)", re.M)


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


@pytest.mark.parametrize("block", [block for block in blocks() if block.values[0].syntax in ("bash", "sh")])
def test_a_pasted_block_does_not_close_the_users_shell(block):
    """`set -e` typed into an interactive shell makes the first failing command end the shell itself."""
    found = SETS_ERREXIT.search(block.code)
    assert found is None, (f"{found.group(0)!r}: a block is pasted into the user's shell, where errexit closes it "
                           "at the first error; the tests run every bash block under `set -eo pipefail` already")


@pytest.mark.parametrize("code", ["false\necho the last command succeeds\n", "false | cat\n"])
def test_a_failing_command_fails_its_block_although_the_block_does_not_set_e(code, tmp_path):
    """Without the repository's conftest.py such a block passes (its status is its last command's); with it, it
    fails."""
    (tmp_path / "doc.md").write_text(f"```bash\n{code}```\n")

    def run_block() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--codeblocks",
                               "doc.md"], cwd=tmp_path, capture_output=True, text=True, timeout=120)

    without = run_block()
    assert without.returncode == 0 and "1 passed" in without.stdout, without.stdout[-2000:]
    (tmp_path / "conftest.py").write_text((REPO_ROOT / "conftest.py").read_text())
    with_conftest = run_block()
    assert with_conftest.returncode == 1 and "1 failed" in with_conftest.stdout, with_conftest.stdout[-2000:]
