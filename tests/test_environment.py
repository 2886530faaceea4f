"""The pinned environment agrees with itself: requirements.lock, environment.yml, requirements.in, pyproject."""

import re
import sys
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_lock_has_exact_pins_and_a_cpu_torch():
    pins = lock_pins()
    assert pins["torch"] == "2.13.0"
    assert len(pins) > 50
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        assert line.startswith("#") or re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.]+", line), line


def test_environment_yml_agrees_with_lock():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    python = next(d for d in deps if isinstance(d, str) and d.startswith("python="))
    header = (ROOT / "requirements.lock").read_text().splitlines()[0]
    assert f"Python {python.removeprefix('python=')}" in header
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    env_pins = {canonicalize_name(p.split("==")[0]): p.split("==")[1] for p in pip}
    assert env_pins == lock_pins()


def test_lock_was_made_for_this_python():
    header = (ROOT / "requirements.lock").read_text().splitlines()[0]
    assert f"Python {sys.version_info.major}.{sys.version_info.minor}" in header


def test_requirements_in_are_all_locked():
    pins = lock_pins()
    for line in (ROOT / "requirements.in").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            name = canonicalize_name(req.name)
            assert name in pins, f"{req.name} is in requirements.in but not locked"
            assert req.specifier.contains(Version(pins[name]), prereleases=True), (req, pins[name])


def test_pyproject_dependencies_are_satisfied_by_the_lock():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = lock_pins()
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    for spec in reqs:
        req = Requirement(spec)
        if canonicalize_name(req.name) == canonicalize_name(project["name"]):
            assert req.extras <= set(project["optional-dependencies"]), f"{spec}: no such extra"
            continue  # an extra that includes another extra of this package
        version = pins.get(canonicalize_name(req.name))
        assert version is not None, f"{req.name} (pyproject) is not in requirements.lock"
        assert req.specifier.contains(Version(version)), f"lock has {req.name}=={version}, pyproject wants {spec}"


def test_repository_url_is_the_same_everywhere():
    import companion

    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert config["repository"]["url"] == companion.REPOSITORY_URL == project["urls"]["Repository"]
