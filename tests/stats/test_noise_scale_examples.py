"""The noise-over-time examples run and print what they promise (in-process, to save start-up)."""

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = {
    "noise_scale_running.py": ["step 300: B_simple", "per layer:", "steps: 300"],
    "noise_scale_accumulation.py": [
        "plain: B_simple",
        "Adam-preconditioned: B_simple",
        "agreement",
    ],
    "noise_scale_scores.py": ["top-16 by loss", "top-16 by grad_norm", "top-16 by vog"],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name, capsys):
    runpy.run_path(str(ROOT / "examples" / name), run_name="__main__")
    printed = capsys.readouterr().out
    for text in EXPECTED[name]:
        assert text in printed


def test_fsdp_example_runs_on_two_processes():
    """It spawns its own processes, so it runs as a script (runpy cannot pickle its worker)."""
    script = ROOT / "examples" / "fsdp_noise_scale.py"
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for text in ("per-example (GradStats): B_simple", "two-batch hook: B_simple", "over 12 steps"):
        assert text in done.stdout
