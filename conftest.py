"""pytest settings for the whole repository: tests/, and the code blocks of README.md and docs/*.md.

pytest-codeblocks runs a bash block with `bash -c`, whose exit status is the block's last command's. The blocks
are written to be pasted into an interactive shell, where `set -e` would close the shell at the first error, so
they do not say it: here every bash block runs under `set -eo pipefail` (an sh block under `set -e`) instead, so
that any failing command (also one early in a pipe) fails its test. A block that expects a failure says so
(`... || test $? -eq 1`).
"""

ERREXIT = {"bash": "set -eo pipefail\n", "sh": "set -e\n"}


def pytest_collection_modifyitems(items):
    try:
        from pytest_codeblocks.plugin import TestBlock
    except ImportError:
        return
    for item in items:
        if isinstance(item, TestBlock) and item.obj.syntax in ERREXIT:
            prefix = ERREXIT[item.obj.syntax]
            if not item.obj.code.startswith(prefix):
                item.obj.code = prefix + item.obj.code
