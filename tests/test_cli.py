import json
import runpy
import sys
import textwrap
from pathlib import Path

import pytest

from gradnoise.cli import DEFAULTS, main
from gradnoise.monitor.records import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--steps", "4", "--every", "2", "--batch-size", "4", "--no-console"]

FACTORIES = textwrap.dedent("""
    import itertools
    import torch
    import torch.nn.functional as F
    from torch import nn

    def _batches(batch_size):
        g = torch.Generator().manual_seed(0)
        while True:
            x = torch.randn(batch_size, 6, generator=g)
            yield x, torch.randint(0, 2, (batch_size,), generator=g)

    def good(batch_size):
        return nn.Linear(6, 2), _batches(batch_size), lambda m, b: F.cross_entropy(m(b[0]), b[1])

    def listed(batch_size):
        return [nn.Linear(6, 2), _batches(batch_size), None]

    def wrong_model(batch_size):
        return "model", _batches(batch_size), F.cross_entropy
""")


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "my_factories.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "my_factories", raising=False)
    return tmp_path


def _error(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


def test_defaults_are_the_documented_ones():
    assert DEFAULTS == {
        "workload": "markov",
        "steps": 800,
        "batch_size": 32,
        "every": 40,
        "out": "gradnoise-profile",
    }


def test_profile_default_workload_short_run_writes_everything(tmp_path, capsys):
    assert main(["profile", "--out", str(tmp_path / "out"), *TINY]) == 0
    metrics = read_metrics(tmp_path / "out")
    assert [r["step"] for r in metrics.steps] == [1, 3]
    assert metrics.run["workload"] == "markov" and metrics.run["steps"] == 4
    assert (tmp_path / "out" / "report.html").is_file()
    out = " ".join(capsys.readouterr().out.split())
    assert "Profiling cost" in out and "after training, not part of the overhead above" in out


def test_profile_images_with_the_live_console(tmp_path, capsys):
    args = ["profile", "--workload", "images", "--out", str(tmp_path), *TINY[:-1]]
    assert main(args) == 0
    assert "noise scale B_simple" in capsys.readouterr().out


def test_profile_a_user_factory(factories, capsys):
    assert main(["profile", "--model", "my_factories:good", "--out", "run", *TINY]) == 0
    assert read_metrics(factories / "run").run["workload"] == "my_factories:good"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("my_factories:listed", "got a return value of type list. Return (model: nn.Module"),
        ("my_factories:wrong_model", "got a return value of type (str, generator, function)"),
        ("my_factories", "got no ':' between module and function"),
        ("no_such_module_xyz:make", "got a module that cannot be imported"),
        ("missing/file.py:make", "got a module that cannot be imported"),
        ("my_factories:absent", "got no function 'absent' in module 'my_factories'"),
    ],
)
def test_bad_factories_get_a_clear_error(factories, capsys, spec, message):
    assert main(["profile", "--model", spec, "--out", "run", *TINY]) == 2
    err = _error(capsys)
    assert f"--model {spec}: expected MODULE:FACTORY naming a function" in err and message in err
    assert not (factories / "run").exists()


def test_unknown_workload(tmp_path, capsys):
    assert main(["profile", "--workload", "mnist", "--out", str(tmp_path / "o"), *TINY]) == 2
    assert "error: workload: expected one of 'markov', 'images', 'charlm', got 'mnist'" in _error(
        capsys
    )
    assert not (tmp_path / "o").exists()


def test_out_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("x")
    assert main(["profile", "--out", str(target), *TINY]) == 2
    assert "output directory: expected a directory (existing or new), got" in _error(capsys)
    assert target.read_text() == "x"


def test_fewer_steps_than_every(tmp_path, capsys):
    assert main(["profile", "--steps", "3", "--every", "5", "--out", str(tmp_path / "o")]) == 2
    assert (
        "--steps: expected an int >= --every (5), so at least one step is measured, got 3"
        in _error(capsys)
    )


def test_report_rerenders_and_counts_a_corrupt_line(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["profile", "--workload", "images", "--out", str(out), *TINY]) == 0
    (out / "report.html").unlink()
    with (out / "metrics.jsonl").open("a") as handle:
        handle.write('{"kind": "step", "step": 9, "trunc\n')
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert "skipped 1 unreadable line(s) of metrics.jsonl" in capsys.readouterr().out
    assert (out / "report.html").is_file()


def test_report_on_a_directory_without_metrics(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "expected a directory that holds metrics.jsonl, got a directory without it" in _error(
        capsys
    )


def test_python_dash_m_runs_the_cli(tmp_path, monkeypatch, capsys):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "run"}) + "\n")
    monkeypatch.setattr(sys, "argv", ["gradnoise", "report", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("gradnoise", run_name="__main__")
    assert exit_info.value.code == 2 and "expected at least one step record" in _error(capsys)


def test_the_example_factory_profiles(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "factory"
    assert (
        main(["profile", "--model", "examples/profile_factory.py:make", "--out", str(out), *TINY])
        == 0
    )
    assert len(read_metrics(out).steps) == 2


def test_the_monitor_loop_example_runs(tmp_path, monkeypatch, capsys):
    script = ROOT / "examples" / "profile_loop.py"
    monkeypatch.setattr(sys, "argv", [str(script), str(tmp_path)])
    runpy.run_path(str(script), run_name="__main__")
    assert "B_simple ~" in capsys.readouterr().out and (tmp_path / "report.html").is_file()


LOADER_FACTORIES = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from torch import nn

    SEEN = []

    def loader(batch_size):
        x, y = torch.randn(16, 6), torch.randint(0, 2, (16,))
        data = torch.utils.data.TensorDataset(x, y)
        model = nn.Linear(6, 2)
        SEEN.append(model.weight.detach().clone())
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size)
        return model, loader, lambda m, b: F.cross_entropy(m(b[0]), b[1])

    def no_batch_size():
        return None

    def bn(batch_size):
        model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
        x, y = torch.randn(16, 6), torch.randint(0, 2, (16,))
        return model, [(x, y)], lambda m, b: F.cross_entropy(m(b[0]), b[1])
""")


@pytest.fixture
def loaders(tmp_path, monkeypatch):
    (tmp_path / "my_loaders.py").write_text(LOADER_FACTORIES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "my_loaders", raising=False)
    return tmp_path


def test_a_finite_dataloader_is_cycled_for_the_requested_steps(loaders):
    args = ["profile", "--model", "my_loaders:loader", "--out", "run", "--no-console"]
    assert main([*args, "--steps", "12", "--every", "4", "--batch-size", "4"]) == 0
    run = read_metrics(loaders / "run").run
    assert run["steps"] == 12 and run["batches_exhausted"] is False and run["lr"] == 1e-3


def test_seed_and_lr_reach_a_model_factory(loaders):
    args = ["profile", "--model", "my_loaders:loader", "--no-console", "--steps", "4"]
    args += ["--every", "2", "--batch-size", "4"]
    assert main([*args, "--out", "a", "--seed", "3", "--lr", "0.01"]) == 0
    assert main([*args, "--out", "b", "--seed", "3"]) == 0
    assert main([*args, "--out", "c", "--seed", "4"]) == 0
    seen = sys.modules["my_loaders"].SEEN
    assert seen[0].equal(seen[1]) and not seen[0].equal(seen[2])
    assert read_metrics(loaders / "a").run["lr"] == 0.01


def test_a_factory_without_batch_size_is_refused(loaders, capsys):
    assert main(["profile", "--model", "my_loaders:no_batch_size", "--out", "run", *TINY]) == 2
    assert "which cannot be called as no_batch_size(batch_size=B)" in _error(capsys)
    assert not (loaders / "run").exists()


def test_the_name_of_a_non_factory_function_is_refused(loaders, capsys):
    spec = str(ROOT / "examples" / "profile_factory.py") + ":loss_fn"
    assert main(["profile", "--model", spec, "--out", "run", *TINY]) == 2
    assert "loss_fn(model: torch.nn.modules.module.Module, batch)" in _error(capsys)


def test_batch_size_zero_with_a_model_is_refused(loaders, capsys):
    args = ["profile", "--model", "my_loaders:loader", "--out", "run", *TINY]
    assert main([*args, "--batch-size", "0"]) == 2
    assert "--batch-size: expected an int >= 2" in _error(capsys)
    assert not (loaders / "run").exists()


def test_batch_norm_in_train_mode_is_refused_before_any_step(loaders, capsys):
    assert main(["profile", "--model", "my_loaders:bn", "--out", "run", *TINY]) == 2
    assert "batch normalization in training mode" in _error(capsys)
    assert not (loaders / "run" / "metrics.jsonl").exists()


def test_out_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["profile", "--out", str(tmp_path / "f" / "sub"), *TINY]) == 2
    assert "which lies under the file" in _error(capsys)


def test_out_that_cannot_be_written_is_refused(tmp_path, capsys, monkeypatch):
    import gradnoise.monitor.checks as checks

    def denied(**kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checks.tempfile, "TemporaryFile", denied)
    assert main(["profile", "--out", str(tmp_path / "ro"), *TINY]) == 2
    assert "which cannot be written (Permission denied)" in _error(capsys)


def test_help_states_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["profile", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("(default 800)", "(default 32)", "(default 0)", "(default gradnoise-profile)"):
        assert text in out
    assert "re-iterated each epoch" in out and "--lr" in out


def test_calibrate_command_writes_its_file_and_explains_bad_lists(tmp_path, capsys):
    out = tmp_path / "cal"
    argv = ["calibrate", "--workload", "images", "--batches", "4,8,16", "--lr-factors", "1"]
    assert main([*argv, "--budget", "2560", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "calibrating images: 3 fixed-batch runs" in printed
    assert "Calibration over 1 seed(s)" in printed and (out / "calibration.json").is_file()
    with pytest.raises(SystemExit):
        main(["calibrate", "--batches", "8,x"])
    assert "expected comma-separated integers, got '8,x'" in capsys.readouterr().err
    assert main(["calibrate", "--batches", "8,16", "--out", str(tmp_path / "o")]) == 2
    assert "--batches: expected at least 3 batch sizes" in capsys.readouterr().err
