"""`pip install .` into a clean virtual environment gives an importable package that carries its data
manifest. Versions are constrained by requirements.lock (otherwise pip would pick a multi-GB CUDA torch)."""

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_pip_install_into_clean_venv(tmp_path):
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    wheels = tmp_path / "wheels"
    run = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900, cwd=tmp_path)  # noqa: E731
    run(str(python), "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT))
    wheel = next(wheels.glob("companion-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "companion/_data_manifest.json" in names and "companion/data.py" in names
    assert not any(n.startswith(("tests/", "book/", "data/")) for n in names), names
    run(str(python), "-m", "pip", "install", "-q", "-c", str(ROOT / "requirements.lock"), str(wheel))
    out = run(str(python), "-c", "import companion, companion.data as d; "
              "print(companion.__version__, d.checkout_data_dir(), len(d.load_manifest()) == "
              f"len(d.load_manifest(__import__('pathlib').Path({str(ROOT / 'data' / 'manifest.json')!r}))))",
              ).stdout.split()
    assert out == [companion_version(), "None", "True"], out


def companion_version() -> str:
    sys.path.insert(0, str(ROOT))
    from companion._meta import __version__

    return __version__
