"""Notebook conventions, and proof that the reproduction check works: nbval catches an altered output,
and a notebook executed from its own folder and from another folder gives the committed outputs."""

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from notebooks import SETUP_CELL, notebooks  # noqa: E402

NOTEBOOKS = notebooks()
PROBE = ROOT / "book" / "appendix" / "environment.ipynb"  # fast, exercises the whole pipeline
SANITIZE = [(re.compile(r"0x[0-9a-fA-F]{6,}"), "0xADDRESS"), (re.compile(r"(/private)?(/tmp|/var/folders)/[^\s'\"]+"), "TMPPATH")]


def _ids(paths):
    return [str(p.relative_to(ROOT)) for p in paths]


def test_there_are_notebooks():
    assert PROBE in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_conventions(path):
    nb = nbformat.read(path, as_version=4)
    title, setup = nb.cells[0], nb.cells[1]
    assert title.cell_type == "markdown" and title.source.startswith("# "), "cell 1 must be a '# title'"
    assert setup.cell_type == "code" and setup.source == SETUP_CELL, "cell 2 must be tools/notebooks.py's SETUP_CELL"
    assert "hide-input" in setup.metadata.get("tags", []), "the setup cell is collapsed in the book (tag hide-input)"
    assert nb.metadata["kernelspec"]["name"] == "python3"
    # nbformat 4.5 cell ids, read from the file (nbformat.read fills in missing ones with a warning, an error to come)
    ids = [c.get("id") for c in json.loads(Path(path).read_text(encoding="utf-8"))["cells"]]
    assert all(ids), f"cells {[i for i, x in enumerate(ids) if not x]} lack an id"
    assert len(set(ids)) == len(ids), f"repeated cell ids: {sorted({x for x in ids if ids.count(x) > 1})}"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "every code cell must be executed (outputs committed)"
    for cell in code:
        for out in cell.outputs:
            assert out.output_type != "error", f"error output in: {cell.source[:60]!r}"
            assert not (out.output_type == "stream" and out.name == "stderr"), f"stderr in: {cell.source[:60]!r}: {out.text[:200]!r}"
    ignored = [c for c in code if "NBVAL_IGNORE_OUTPUT" in c.source]
    assert len(ignored) <= max(1, len(code) // 10), f"{len(ignored)} of {len(code)} code cells are not compared"


def test_every_notebook_is_in_the_table_of_contents():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = set(re.findall(r"file: ([^\s]+)", (ROOT / "_toc.yml").read_text())) | {toc["root"]}
    for path in NOTEBOOKS:
        assert str(path.relative_to(ROOT).with_suffix("")) in files, f"{path} is not in _toc.yml"
    for entry in files:
        assert any((ROOT / f"{entry}{ext}").is_file() for ext in (".md", ".ipynb")), f"_toc.yml lists missing {entry}"


def _nbval(paths, cwd):
    cmd = [sys.executable, "-m", "pytest", "--nbval", "--nbval-current-env", "-p", "no:cacheprovider",
           "--nbval-sanitize-with", str(ROOT / "book" / "nbval_sanitize.cfg"),
           "-c", str(cwd / "pytest.ini"), "--rootdir", str(cwd), "-q", "-rA", *map(str, paths)]
    (cwd / "pytest.ini").write_text("[pytest]\n")
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_nbval_fails_on_an_altered_output(tmp_path):
    nb = nbformat.read(PROBE, as_version=4)
    nbformat.write(nb, tmp_path / "original.ipynb")
    altered = copy.deepcopy(nb)
    cell = next(c for c in altered.cells if c.cell_type == "code" and "torch.softmax" in c.source)
    text = cell.outputs[0].text
    cell.outputs[0].text = text.replace("0.6590", "0.6591")
    assert cell.outputs[0].text != text, "the probe notebook's softmax output changed; update this test"
    nbformat.write(altered, tmp_path / "altered.ipynb")
    result = _nbval([tmp_path / "original.ipynb", tmp_path / "altered.ipynb"], tmp_path)
    summary = result.stdout
    assert result.returncode == 1, summary[-2000:]
    failed = re.findall(r"^FAILED (\S+)", summary, re.M)
    assert failed and all(f.startswith("altered.ipynb") for f in failed), summary[-2000:]
    assert re.search(r"^PASSED original\.ipynb", summary, re.M), summary[-2000:]


def _outputs(nb):
    """What nbval compares: text of streams and text/plain results, sanitized."""
    result = []
    for cell in nb.cells:
        if cell.cell_type != "code" or "NBVAL_IGNORE_OUTPUT" in cell.source:
            continue
        texts = []
        for out in cell.outputs:
            text = out.get("text") or out.get("data", {}).get("text/plain", "")
            for pattern, replacement in SANITIZE:
                text = pattern.sub(replacement, text)
            texts.append((out.output_type, text))
        result.append(texts)
    return result


def _execute(path, cwd):
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def test_outputs_identical_from_another_working_directory(tmp_path):
    committed = _outputs(nbformat.read(PROBE, as_version=4))
    assert _outputs(_execute(PROBE, PROBE.parent)) == committed
    assert _outputs(_execute(PROBE, tmp_path)) == committed


def test_nbval_collects_every_book_notebook_and_nothing_from_build():
    result = subprocess.run([sys.executable, "-m", "pytest", "--nbval", "--collect-only", "-q", "book"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    collected = {line.split("::")[0] for line in result.stdout.splitlines() if ".ipynb::" in line}
    assert collected == set(_ids(NOTEBOOKS)), result.stdout[-2000:]
    assert not any("_build" in c for c in collected)


def _notebook_imports(path):
    """Top-level module names imported by a notebook's code cells (the setup cell's Colab branch excluded)."""
    import ast

    names = set()
    for cell in nbformat.read(path, as_version=4).cells[2:]:
        if cell.cell_type != "code":
            continue
        source = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def _installed_closure(requirement):
    """Distributions (normalised names) that installing ``requirement`` brings, read from installed metadata."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen, todo = set(), [(Requirement(requirement), frozenset(Requirement(requirement).extras))]
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        key = (name, extras)
        if key in seen:
            continue
        seen.add(key)
        if name == "companion":
            import tomllib

            project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
            deps = list(project["dependencies"]) + [d for e in extras for d in project["optional-dependencies"][e]]
            todo += [(Requirement(d), frozenset(Requirement(d).extras)) for d in deps]
            continue
        for dep in metadata.requires(req.name) or []:
            dep = Requirement(dep)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in (extras or {""})):
                todo.append((dep, frozenset(dep.extras)))
    return {name for name, _ in seen}


def test_setup_cell_installs_every_module_a_notebook_imports():
    """What the Colab setup cell installs (``companion[colab]`` and its dependencies) provides every import."""
    from importlib import metadata

    from packaging.utils import canonicalize_name

    requirement = re.search(r'"(companion[^"]*) @ git\+', SETUP_CELL).group(1)
    provided = _installed_closure(requirement)
    owners = metadata.packages_distributions()
    missing = {}
    for path in NOTEBOOKS:
        for module in _notebook_imports(path):
            if module in sys.stdlib_module_names or module == "companion":
                continue
            dists = {canonicalize_name(d) for d in owners.get(module, [])}
            if not dists & provided:
                missing.setdefault(module, []).append(str(path.relative_to(ROOT)))
    assert not missing, f"imported by notebooks but not installed by {requirement!r}: {missing}"


def test_notebooks_call_no_private_names():
    """A notebook uses the package's public API only (no ``module._private`` attribute or import)."""
    import ast

    offenders = []
    for path in NOTEBOOKS:
        for cell in nbformat.read(path, as_version=4).cells[2:]:
            if cell.cell_type != "code":
                continue
            tree = ast.parse("\n".join(l for l in cell.source.splitlines() if not l.lstrip().startswith(("%", "!"))))
            for node in ast.walk(tree):
                private = (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                           or isinstance(node, ast.ImportFrom) and any(a.name.startswith("_") for a in node.names)
                           or isinstance(node, ast.ImportFrom) and node.module and any(
                               p.startswith("_") for p in node.module.split(".")))
                if private:
                    offenders.append(f"{path.relative_to(ROOT)}: {ast.unparse(node)[:80]}")
    assert not offenders, "\n".join(offenders)


def _foreign_cpu_env():
    line = next(l for l in (ROOT / "Makefile").read_text().splitlines() if l.startswith("FOREIGN_CPU :="))
    return dict(item.split("=", 1) for item in line.split(":=", 1)[1].split())


def test_foreign_cpu_settings_are_taken_by_torch():
    """The second nbval pass really runs on PyTorch's portable kernels (not silently on the native ones)."""
    env = {**os.environ, **_foreign_cpu_env()}
    assert env["ATEN_CPU_CAPABILITY"] == "default"
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == "DEFAULT"


def test_conftest_refuses_a_capability_torch_did_not_take(tmp_path):
    (tmp_path / "test_x.py").write_text("def test_x():\n    pass\n")
    shutil.copy(ROOT / "conftest.py", tmp_path / "conftest.py")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "bogus"}  # torch ignores an unknown value and keeps its native kernels
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "torch reports" in result.stdout + result.stderr, result.stdout[-1000:]
