import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradnoise.errors import GradNoiseError
from gradnoise.monitor import Monitor, read_metrics
from gradnoise.monitor.noise import NoiseScale
from gradnoise.monitor.records import clean
from gradnoise.monitor.sinks import tensorboard_available
from gradnoise.monitor.timing import overhead_summary


def _problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    return model, x, y


def _train(monitor, model, x, y, steps, losses=None):
    for i in range(steps):
        with monitor.step() as step:
            loss = F.cross_entropy(model(x), y) * (1 if losses is None else 0) + (
                0 if losses is None else losses[i]
            )
            if losses is None:
                loss.backward()
            step.loss = loss


def test_measures_one_step_in_every_and_averages_the_loss_between():
    model, x, y = _problem()
    monitor = Monitor(model, every=3)
    for i in range(7):
        with monitor.step() as step:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            step.loss = torch.tensor(float(i))
    run = monitor.close()
    assert [r["step"] for r in monitor.records] == [2, 5]
    assert [r["loss"] for r in monitor.records] == [1.0, 4.0]  # mean of 0,1,2 and of 3,4,5
    assert run["steps"] == 7 and run["measured_steps"] == 2 and run["plain_steps"] == 5
    record = monitor.records[-1]
    assert record["batch_size"] == 16 and len(record["example_norms"]) == 16
    assert set(record["gsnr"]) == {n for n, _ in model.named_parameters()}
    assert record["b_simple"] is None or record["b_simple"] > 0


def test_the_record_matches_a_direct_gradstats_measurement():
    from gradnoise import GradStats

    model, x, y = _problem()
    with GradStats(model) as stats:
        F.cross_entropy(model(x), y).backward()
    direct = stats.noise_scale()
    model.zero_grad()
    monitor = Monitor(model, every=1)
    with monitor.step():
        F.cross_entropy(model(x), y).backward()
    record = monitor.records[0]
    assert math.isclose(record["trace_sigma"], direct.trace_sigma, rel_tol=1e-5)
    norms = stats.total_sq_norms().sqrt()
    assert record["example_norms"] == pytest.approx(norms.tolist(), rel=1e-4)


def test_only_measured_steps_run_with_hooks():
    model, x, y = _problem()
    monitor = Monitor(model, every=2)
    seen = []
    for _ in range(2):
        with monitor.step():
            seen.append(sum(len(p._backward_hooks or {}) for p in model.parameters()))
            F.cross_entropy(model(x), y).backward()
    assert seen[0] == 0 and seen[1] == 4  # one gradient hook per parameter while measured
    assert sum(len(p._backward_hooks or {}) for p in model.parameters()) == 0


def test_an_error_inside_a_step_removes_the_hooks_and_the_next_step_works():
    model, x, y = _problem()
    monitor = Monitor(model, every=1)
    with pytest.raises(RuntimeError, match="boom"), monitor.step():
        model(x)
        raise RuntimeError("boom")
    with monitor.step():
        F.cross_entropy(model(x), y).backward()
    assert len(monitor.records) == 1


def test_writes_metrics_plots_and_report(tmp_path):
    model, x, y = _problem()
    with Monitor(model, out=tmp_path / "run", every=2) as monitor:
        _train(monitor, model, x, y, 5)
        monitor.meta = {"workload": "toy"}
    metrics = read_metrics(tmp_path / "run")
    assert [r["step"] for r in metrics.steps] == [1, 3] and metrics.skipped == 0
    assert metrics.run["workload"] == "toy" and metrics.run["overhead_fraction"] is not None
    for name in ("noise_scale", "gsnr", "norms", "loss"):
        assert (tmp_path / "run" / "plots" / f"{name}.png").stat().st_size > 1000
    assert "data:image/png;base64," in (tmp_path / "run" / "report.html").read_text()


@pytest.mark.skipif(not tensorboard_available(), reason="tensorboard extra not installed")
def test_tensorboard_events_are_written_when_installed(tmp_path):
    model, x, y = _problem()
    with Monitor(model, out=tmp_path, every=1, report=False) as monitor:
        _train(monitor, model, x, y, 2)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_an_out_path_that_is_a_file_is_refused_before_anything_is_written(tmp_path):
    target = tmp_path / "taken"
    target.write_text("keep me")
    model, _, _ = _problem()
    with pytest.raises(
        GradNoiseError,
        match=r"output directory: expected a directory .* which is "
        r"a file\. Pass a directory path",
    ):
        Monitor(model, out=target)
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("every", [0, -1, 2.5, True])
def test_every_must_be_a_positive_int(every):
    model, _, _ = _problem()
    with pytest.raises(GradNoiseError, match=r"every: expected an int >= 1"):
        Monitor(model, every=every)


def test_model_must_be_a_module():
    with pytest.raises(
        GradNoiseError, match=r"Monitor\(model\): expected a torch.nn.Module, got list"
    ):
        Monitor([torch.zeros(1)])


def test_begin_and_end_must_alternate():
    model, _, _ = _problem()
    monitor = Monitor(model, every=5)
    with pytest.raises(GradNoiseError, match=r"Monitor.end_step: expected a begin_step\(\) before"):
        monitor.end_step()
    monitor.begin_step()
    with pytest.raises(GradNoiseError, match=r"Monitor.begin_step: .*got two begin_step\(\) calls"):
        monitor.begin_step()


def test_overhead_is_measured_steps_minus_the_median_plain_step_plus_monitor_time():
    summary = overhead_summary([1.0, 1.0, 3.0], [2.0, 2.5], 0.5, 10.0)
    assert summary["plain_step_median"] == 1.0
    assert summary["overhead_seconds"] == pytest.approx((2.0 - 1.0) + (2.5 - 1.0) + 0.5)
    assert summary["overhead_fraction"] == pytest.approx(3.0 / 7.0)
    assert summary["measured_step_ratio"] == pytest.approx(2.25)
    assert overhead_summary([], [1.0], 0.0, 1.0)["overhead_fraction"] is None


def test_the_running_reading_is_the_noise_scale_of_the_measured_steps():
    from gradnoise import GradStats

    model, x, y = _problem()
    monitor = Monitor(model, every=1, beta=0.9)
    reference = NoiseScale(beta=0.9)
    for scale in (1.0, 0.5, 2.0):
        with monitor.step():
            (scale * F.cross_entropy(model(x), y)).backward()
        with GradStats(model) as stats:
            (scale * F.cross_entropy(model(x), y)).backward()
        reference.update(stats)
    expected = reference.estimate()
    record = monitor.records[-1]
    assert record["b_simple"] == pytest.approx(expected.b_simple, rel=1e-5)
    assert record["ci_low"] == pytest.approx(expected.ci_low, rel=1e-5)
    layers = {k: v for k, v in expected.per_layer.items() if math.isfinite(v)}
    assert record["layer_noise_scale"] == pytest.approx(clean(expected.per_layer) | layers)


def test_batch_norm_in_train_mode_is_refused_at_construction(tmp_path):
    from gradnoise.errors import BatchCouplingError

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    with pytest.raises(BatchCouplingError, match="batch normalization in training mode"):
        Monitor(model, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()
