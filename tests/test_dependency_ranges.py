"""The lowest dependency versions mlxfun declares are the ones CI tests: constraints-lowest.txt
(the pins `tox -e lowest` installs) names exactly the lower bound of every third-party
dependency in the packages' pyproject.toml files, so the two cannot drift apart; and in that
env (MLXFUN_TEST_LOWEST=1) the installed versions are the pins."""

import configparser
import os
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mlxfun-core", "mlxfun-adapters", "mlxfun-methods", "mlxfun-cli")
CONSTRAINTS = ROOT / "constraints-lowest.txt"
TOOLING_EXTRAS = {"test"}  # pytest: the test runner, not something mlxfun runs on


def declared() -> dict[str, list[tuple[str, Requirement]]]:
    """Third-party requirements (extras included) by name: ``[(package, requirement), ...]``."""
    found: dict = {}
    for package in PACKAGES:
        project = tomllib.loads((ROOT / package / "pyproject.toml").read_text())["project"]
        lines = list(project.get("dependencies", []))
        for extra, extra_lines in project.get("optional-dependencies", {}).items():
            if extra not in TOOLING_EXTRAS:
                lines += extra_lines
        for line in lines:
            requirement = Requirement(line)
            name = canonicalize_name(requirement.name)
            if not name.startswith("mlxfun-"):
                found.setdefault(name, []).append((package, requirement))
    return found


def lower_bound(requirement: Requirement) -> Version:
    bounds = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    assert len(bounds) == 1, f"{requirement} needs exactly one >= lower bound"
    return bounds[0]


def pins() -> dict[str, Version]:
    result = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==" and not requirement.extras, line
            result[canonicalize_name(requirement.name)] = Version(spec.version)
    return result


def test_every_package_declares_the_same_range_with_a_lower_bound():
    for name, requirements in declared().items():
        ranges = {(str(r.specifier), lower_bound(r)) for _, r in requirements}
        assert len(ranges) == 1, f"{name}: {[(p, str(r)) for p, r in requirements]}"


def test_the_constraints_pin_exactly_the_lower_bounds():
    expected = {name: lower_bound(reqs[0][1]) for name, reqs in declared().items()}
    assert pins() == expected
    for name, pinned in pins().items():  # the exact release (1.26.0), not an abbreviation
        assert (name, len(pinned.release)) == (name, 3), f"pin {name}=={pinned} as X.Y.Z"


def test_tox_lowest_installs_with_the_constraints():
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(ROOT / "tox.ini")
    deps = tox["testenv:lowest"]["deps"].split()
    assert deps[deps.index("-c") + 1] == "{tox_root}/" + CONSTRAINTS.name
    assert "MLXFUN_TEST_LOWEST" in tox["testenv:lowest"]["set_env"]


@pytest.mark.skipif(not os.environ.get("MLXFUN_TEST_LOWEST"), reason="only in tox -e lowest")
def test_the_lowest_versions_are_installed():
    installed = {name: Version(version(name)) for name in pins()}
    assert installed == pins()
