"""CI tests the oldest releases pyproject.toml allows: `.ci/oldest.txt` must name exactly those."""

from __future__ import annotations

import tomllib

from conftest import REPO_ROOT
from packaging.requirements import Requirement


def lower_bounds() -> dict[str, str]:
    """`{name: version}` of every dependency whose range has a `>=` bound."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    bounds = {}
    for line in project["dependencies"]:
        requirement = Requirement(line)
        for specifier in requirement.specifier:
            if specifier.operator == ">=":
                bounds[requirement.name] = specifier.version
    return bounds


def oldest_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / ".ci" / "oldest.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip()] = version.strip()
    return pins


def test_ci_installs_the_oldest_allowed_releases():
    bounds, pins = lower_bounds(), oldest_pins()
    assert {"torch", "torchvision", "transformers"} <= pins.keys()
    for name, version in pins.items():
        # The bound may leave out trailing parts: torch>=2.9 is first met by 2.9.1 when 2.9.0 is not installable.
        assert version.startswith(bounds[name]), f"{name}: pyproject.toml allows >={bounds[name]}, CI pins {version}"


def test_the_readme_states_both_test_commands_that_ci_runs():
    readme = (REPO_ROOT / "README.md").read_text()
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    commands = [line.strip().strip("'") for line in ci.splitlines() if line.strip().startswith("'pip install")]
    assert len(commands) == 2
    for command in commands:
        assert command in readme, f"README.md lacks CI's command: {command}"
