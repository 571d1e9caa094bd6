"""The RL examples run end to end, in-process (the allocation loop for one short step)."""

import runpy
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run(script, *args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(script), *map(str, args)])
    runpy.run_path(str(script), run_name="__main__")
    return capsys.readouterr().out


def test_advantages_example_prints_every_method_and_ranks_delta_l_lowest(capsys, monkeypatch):
    out = run(EXAMPLES / "rl_advantages.py", capsys=capsys, monkeypatch=monkeypatch)
    for name in ("grpo", "dr_grpo", "rloo", "opo", "bnpo", "token_mean", "delta_l"):
        assert name in out
    relative = {
        line.split()[0]: float(line.split()[-1]) for line in out.splitlines() if "tr Cov" in line
    }
    assert min(relative, key=relative.get) == "delta_l"


def test_allocation_example_runs(capsys, monkeypatch):
    out = run(EXAMPLES / "rl_allocation.py", 1, 5, capsys=capsys, monkeypatch=monkeypatch)
    assert "greedy accuracy before RL" in out and "step   0" in out and "after RL" in out
