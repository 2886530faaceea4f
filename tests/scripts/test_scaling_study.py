"""scripts/scaling_study.py: a two-run study writes one CSV row per run with C = 6ND; the committed results file
is the one the manifest records and agrees with the same formula."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from companion.data import data_path
from companion.scaling import training_flops

ROOT = Path(__file__).resolve().parents[2]


def _rows(path):
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_script_writes_one_row_per_run(tmp_path):
    out = tmp_path / "study.csv"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "scaling_study.py"), "--sizes", "1", "--steps", "2", "3",
                    "--train-poems", "200", "--eval-poems", "20", "--out", str(out)],
                   check=True, capture_output=True, cwd=ROOT)
    rows = _rows(out)
    assert [int(r["steps"]) for r in rows] == [2, 3]
    for r in rows:
        assert int(r["tokens"]) == int(r["steps"]) * 16 * 32  # batch_size * block_size per step
        assert float(r["flops"]) == pytest.approx(training_flops(int(r["n_params"]), int(r["tokens"])), rel=1e-3)
        assert 0 < int(r["n_params_non_embedding"]) < int(r["n_params"])


def test_script_refuses_budgets_larger_than_the_data(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "scaling_study.py"), "--sizes", "1", "--steps",
                             "1000", "--train-poems", "50", "--out", str(tmp_path / "x.csv")],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and "raise --train-poems" in result.stderr


def test_committed_results():
    rows = _rows(data_path("results/scaling_tang.csv"))  # sha256 checked against the manifest
    assert len(rows) == 18 and len({(r["n_params"], r["tokens"]) for r in rows}) == 18
    for r in rows:
        assert float(r["flops"]) == pytest.approx(training_flops(int(r["n_params"]), int(r["tokens"])), rel=1e-3)
