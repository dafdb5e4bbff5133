"""What a test does when the parity fixtures made with the original xT code are missing.

Locally the fixtures (`../shared/fixtures/original_xt/`) are optional: tests that need them skip. CI
always has them, so there a missing fixture means a broken checkout and the test fails instead of
hiding it behind a skip. CI is recognised by the environment variable `CI` set to `true` (or `1`),
as GitHub Actions, GitLab CI and most other services do.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

CI_VALUES = frozenset({"true", "1"})


def fixtures_required(environ: Mapping[str, str] | None = None) -> bool:
    """True on CI (`CI=true`), where a missing fixture must fail the test rather than skip it."""
    environ = os.environ if environ is None else environ
    return environ.get("CI", "").strip().lower() in CI_VALUES


def missing_fixture_action(available: bool, environ: Mapping[str, str] | None = None) -> str:
    """'run' when the fixtures are there, else 'fail' on CI and 'skip' locally."""
    if available:
        return "run"
    return "fail" if fixtures_required(environ) else "skip"


def skip_or_fail(reason: str, environ: Mapping[str, str] | None = None) -> None:
    """Skip the calling test for a missing fixture, or fail it on CI. Never returns."""
    import pytest

    if missing_fixture_action(False, environ) == "fail":
        pytest.fail(f"{reason}: CI=true requires the parity fixtures (check out ../shared/fixtures/original_xt)",
                    pytrace=False)
    pytest.skip(reason)


def require_fixtures(paths: Iterable[str | Path], environ: Mapping[str, str] | None = None) -> None:
    """Skip (locally) or fail (on CI) unless every path exists, naming the missing ones."""
    missing = [str(path) for path in paths if not Path(path).exists()]
    if missing:
        skip_or_fail(f"parity fixtures not found: {', '.join(missing)}", environ)
