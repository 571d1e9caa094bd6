"""The estimator examples run and print what they promise."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("script", "expected"),
    [("estimators_compare.py", "pathwise+qmc"), ("estimators_mezo.py", "MeZO: loss")],
)
def test_example_runs(script, expected):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)],
        capture_output=True, text=True, check=True, env=env, timeout=120,
    )  # fmt: skip
    assert expected in result.stdout
