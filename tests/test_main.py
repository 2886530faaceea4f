"""``python -m companion``: bad input ends the way argparse ends it — the usage, one ``error:`` line, exit
status 2 — and never with a traceback (checked through the real entry point in a subprocess)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from companion.__main__ import main

ROOT = Path(__file__).resolve().parent.parent


def run(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "companion", *argv], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=120)


@pytest.mark.parametrize("argv", [
    ["train", "--config", "configs/no_such_config.json"],
    ["train", "--config", "configs/tang_gpt.json", "--max-steps", "0"],
    ["train", "--config", "configs/tang_gpt.json", "--precision", "fp8"],
    ["train", "--config", "README.md"],
])
def test_bad_input_exits_2_with_one_error_line(argv):
    result = run(*argv)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert result.stderr.strip().splitlines()[-1].startswith(f"python -m companion {argv[0]}: error: ")


def _usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_prepare_data_bad_input(capsys, tmp_path):
    line = _usage_error(capsys, ["prepare-data", "--only", "poetry/song.jsonl.gz"])
    assert line.startswith("python -m companion prepare-data: error: argument --only: invalid choice: "
                           "'poetry/song.jsonl.gz'")
    (tmp_path / "file").write_text("")
    line = _usage_error(capsys, ["prepare-data", "--data-dir", str(tmp_path / "file")])
    assert line.endswith(f"--data-dir {tmp_path / 'file'} is not a directory")


def test_unknown_command(capsys):
    assert "invalid choice: 'fine-tune'" in _usage_error(capsys, ["fine-tune"])
